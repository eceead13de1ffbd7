"""Integrations of ckpts with training frameworks (each imported on its own, behind its extra)."""
