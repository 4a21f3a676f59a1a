"""diffcore: a plugin-based inference SDK for diffusion models."""
__version__ = "0.1.0"
