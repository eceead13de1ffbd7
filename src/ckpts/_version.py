"""The installed version of ckpts."""

__version__ = "0.1.0"
