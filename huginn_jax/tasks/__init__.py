"""Synthetic tasks for training and evaluating small recurrent-depth models."""
