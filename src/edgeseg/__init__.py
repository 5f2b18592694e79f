"""edgeseg: efficient semantic segmentation on edge devices.

TopFormer and SegFormer exact to their official implementations (official checkpoints give the papers' numbers),
DynaSegFormer's per-image pruning, and the recipes, evaluation and deployment around them.
"""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["Segmenter", "create_model", "list_models", "load_checkpoint", "load_model", "save_checkpoint",
           "__version__"]


def __getattr__(name: str):
    # Segmenter pulls in the data pipeline; import it only when asked for, so `import edgeseg` stays light.
    if name == "Segmenter":
        from .deploy.predict import Segmenter

        return Segmenter
    raise AttributeError(f"module 'edgeseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy Segmenter too, for completion and help()
