"""lightning_sparse: sparse training for PyTorch Lightning + timm."""

__version__ = "0.1.0"
