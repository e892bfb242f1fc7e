"""Recipes: the README demo, the context-extension experiment, the built-in model's pretraining."""
