"""edgeseg: efficient semantic segmentation on edge devices.

TopFormer and SegFormer exact to their official implementations (official checkpoints give the papers' numbers),
DynaSegFormer's per-image pruning, and the recipes, evaluation and deployment around them.
"""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_checkpoint", "load_model", "save_checkpoint", "__version__"]
