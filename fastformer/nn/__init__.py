"""Drop-in replacements for torch.nn transformer modules, running on fastformer's kernels."""
