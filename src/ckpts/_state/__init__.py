"""Training state."""
