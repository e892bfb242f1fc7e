"""Training: data loading and packing, the fine-tune loop and recipe, checkpoints, retrieval data."""
