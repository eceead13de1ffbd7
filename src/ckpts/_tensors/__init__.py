"""Tensor bytes."""
