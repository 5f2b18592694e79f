"""Model families and the one place that knows them all.

Each family module exposes ``MODELS`` (name → builder), ``PAPER`` (published figures), ``INPUT_SIZES`` (the size a
model is counted at unless told), ``convert_state_dict``
(foreign checkpoint layouts → ours) and ``infer_model`` (architecture from tensor shapes). This module only merges
those tables: a plain dict of builders, no registry decorators.
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

from torch import nn

from . import dynasegformer, segformer, topformer

# Order matters for checkpoint detection: a dynamic TopFormer's state dict holds gates too, and TopFormer claims
# it by its token pyramid before DynaSegFormer looks for gates.
FAMILIES: dict[str, ModuleType] = {"TopFormer": topformer, "SegFormer": segformer, "DynaSegFormer": dynasegformer}

MODELS: dict[str, Any] = {name: build for fam in FAMILIES.values() for name, build in fam.MODELS.items()}
PAPER: dict[str, dict] = {name: fig for fam in FAMILIES.values() for name, fig in getattr(fam, "PAPER", {}).items()}
INPUT_SIZES: dict[str, tuple[int, int]] = {name: size for fam in FAMILIES.values()
                                           for name, size in getattr(fam, "INPUT_SIZES", {}).items()}

# Builder arguments that regularise training and build the same architecture: a resumed run may change them (mmseg
# resumes under an edited config the same way), and a model built with them keeps its published figures.
REGULARISATION_ARGS = frozenset({"drop_rate", "attn_drop_rate", "drop_path_rate", "dropout", "dropout_ratio"})


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, in family order."""
    return list(MODELS)


def is_classifier(name: str) -> bool:
    """Whether ``name`` is an ImageNet classifier (``mit-bX``, ``*-cls``): a backbone with no segmentation head, whose
    weights start a segmentation model's training."""
    return name.startswith("mit-") or name.endswith("-cls")


def family_of(model: str | nn.Module) -> str:
    """The family ("TopFormer", "SegFormer", ...) a model, or a model name, belongs to. A model built from its class
    rather than by :func:`create_model` has no registered name: the module that defines its class says."""
    name = model if isinstance(model, str) else getattr(model, "model_name", None)
    for fam_name, fam in FAMILIES.items():
        if name in fam.MODELS:
            return fam_name
    if not isinstance(model, str):
        for fam_name, fam in FAMILIES.items():
            if type(model).__module__ == fam.__name__:
                return fam_name
    raise ValueError(f"unknown model {name or type(model).__name__!r}: not one of edgeseg's families "
                     f"({', '.join(FAMILIES)}); build it with edgeseg.create_model")


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build a model by name, e.g. ``create_model("topformer-tiny", num_classes=19)``.

    ``overrides`` reach the family builder unchanged (e.g. ``head_channels=128`` for the Base Cityscapes config).
    """
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model '{name}'.{hint} `edgeseg info` lists all models.")
    if num_classes is not None:
        try:
            count = operator.index(num_classes)  # ints of any kind (NumPy's too), never floats or strings
        except TypeError:
            count = -1
        least = 0 if is_classifier(name) else 1  # 0: a classifier's bare backbone
        if count < least or isinstance(num_classes, bool):
            raise ValueError(f"num_classes must be an integer ≥ {least} for {name}, got {num_classes!r}")
        overrides["num_classes"] = count
    return MODELS[name](**overrides)
