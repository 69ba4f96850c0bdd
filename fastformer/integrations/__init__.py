"""Hooks into other libraries: Hugging Face transformers (``hf``) and timm (``timm``).

Each submodule imports its library lazily, so fastformer never requires them.
"""
