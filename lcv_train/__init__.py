"""lcv-train: training for LongCat-Video-class video diffusion transformers."""

__version__ = "0.1.0"
