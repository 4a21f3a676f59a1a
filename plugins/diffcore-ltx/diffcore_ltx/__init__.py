"""LTX-2 text/image-to-video with synchronized audio for diffcore (a diffcore plugin). Importing the package does not import torch."""

__version__ = "0.1.0"
