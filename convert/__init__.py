"""Checkpoint conversion between the Hugging Face / PyTorch layout and Orbax (see the project issues)."""
