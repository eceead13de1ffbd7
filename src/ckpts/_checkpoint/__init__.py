"""One checkpoint."""
