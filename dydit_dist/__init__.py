"""dydit_dist: dynamic diffusion transformers, distributed with Ray and DeepSpeed."""

__version__ = "0.1.0"
