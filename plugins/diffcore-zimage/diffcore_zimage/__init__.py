"""Z-Image and Z-Image-Turbo (Tongyi-MAI) for diffcore (a diffcore plugin). Importing the package does not import torch."""

__version__ = "0.1.0"
