"""clipadapt: few-shot adaptation of CLIP-style models on PyTorch Lightning."""

__version__ = "0.1.0"
