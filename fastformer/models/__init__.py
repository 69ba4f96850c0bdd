"""Transformer models built from fastformer.nn."""
