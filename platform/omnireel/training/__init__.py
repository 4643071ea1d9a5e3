"""Training OmniReel's own small model on generated scenes (see dataset.py and recipe.py)."""
