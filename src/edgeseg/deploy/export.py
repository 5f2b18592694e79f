"""ONNX export of any edgeseg model, checked against onnxruntime before the user ships it.

``torch.onnx.export`` alone leaves three things to every user: exporting the inference form (``fuse()``: BN and the
SegFormer decoder folded, DGL gates folded, gathered widths padded), writing the file so that a failed export never
leaves half of one, and proving the graph computes what PyTorch computes. ``export_onnx`` does all three and reports
the largest difference onnxruntime shows on a random input.

Two exporters: ``"torchscript"`` (the default; traces the forward, torch's ``dynamo=False``) and ``"dynamo"``
(``torch.export``, PyTorch's default since 2.9 and what remains once the TorchScript exporter is removed; needs
onnxscript, in the ``[onnx]`` extra, and opset ≥ 18). Both write the same inputs and outputs.

Shapes are fixed at export by default: TopFormer pools its token pyramid to a grid derived from the input size (and
ONNX's pooling needs whole factors, so TopFormer sizes are multiples of 64), and a dynamic model's batch-of-one fast
path and gate shapes are traced at one shape, so one file serves one (batch, H, W). SegFormer and MiT have neither:
``dynamic=True`` leaves their batch, height and width free (checked at a second shape). Dynamic models export
their gathered inference path (TopK + Gather), so the per-image pruning is kept in the graph.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..fileio import atomic_write
from ..models.dynamic import dynamic_gates

ONNX_EXTRA = "pip install 'edgeseg[onnx]'"


@dataclass
class ExportResult:
    """What was written: the file, the fixed shapes, the ONNX ops used and the onnxruntime check."""

    path: Path
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    opset: int
    fused: bool
    ops: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # onnxruntime vs PyTorch on a random input; None when not checked
    argmax_agreement: float | None = None  # fraction of logit positions where both pick the same class
    dynamic: bool = False  # batch, height and width are graph inputs (checked at a second shape too)


EXPORTERS = ("torchscript", "dynamo")


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int] = (512, 512), batch: int = 1,
                opset: int = 17, fuse: bool = True, check: bool = True, exporter: str = "torchscript",
                dynamic: bool = False) -> ExportResult:
    """Write ``model`` (or its ``fuse()`` form) as an ONNX graph with input ``image`` (batch, 3, H, W) and output
    ``logits``, and check it with onnxruntime.

    The file appears only when the export succeeded (written to a temporary name, then renamed). ``check`` runs the
    graph on a random normalised-image-like input and reports the largest absolute difference to PyTorch's logits
    and how often both pick the same class. ``dynamic`` leaves batch, height and width free in the graph (SegFormer
    and MiT without DGL, TorchScript exporter; TopFormer's pooling and DGL's gates fix them) and checks a second,
    larger shape too. (An *untrained* model is a poor probe: with default BN statistics
    TopFormer's unscaled attention is so sharp that float32 PyTorch itself moves by ~1 against float64. Check with
    trained weights.)
    """
    onnx = _checked_onnx(exporter, opset)
    pool_stride = getattr(model, "pool_stride", None)  # TopFormer: its token pooling is adaptive
    if dynamic:
        _check_dynamic(model, pool_stride, exporter)
    if pool_stride is not None:
        multiple = 32 * pool_stride
        if input_size[0] % multiple or input_size[1] % multiple:
            raise ValueError(f"{getattr(model, 'model_name', 'TopFormer')} exports at sizes that are multiples of "
                             f"{multiple} (ONNX pools only by whole factors), got {input_size[0]}x{input_size[1]}: "
                             f"e.g. --size {_round_up(input_size[0], multiple)} {_round_up(input_size[1], multiple)}")
    fused = fuse and callable(getattr(model, "fuse", None))
    model = model.fuse() if fused else copy.deepcopy(model).eval()
    x = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():  # shape-dependent Python branches are fixed at export: shapes are fixed
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                if exporter == "dynamo":
                    _export_dynamo(model, x, tmp, opset)
                else:
                    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
                    if reference.dim() == 4:  # segmentation logits; a classifier's are (batch, classes)
                        axes["logits"].update({2: "logits_height", 3: "logits_width"})
                    torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=opset, input_names=["image"],
                                      output_names=["logits"], dynamic_axes=axes if dynamic else None)
            except torch.onnx.OnnxExporterError as err:  # e.g. an operator newer than the opset asked for
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise ValueError(f"{getattr(model, 'model_name', 'the model')} does not export at opset {opset} "
                                 f"({first}): try --opset 17 (TorchScript) or 18 (dynamo)") from None
        meta = model_metadata(model)
        if reference.dim() == 4:  # segmentation logits; a classifier's (batch, classes) scores have no stride
            meta["logits_stride"] = str(-(-input_size[0] // reference.shape[2]))
        else:
            meta["logits"] = "(batch, classes): class scores of the whole image"
        _write_metadata(onnx, tmp, meta)

    path = atomic_write(path, write)

    ops = sorted({node.op_type for node in onnx.load(str(path)).graph.node})
    result = ExportResult(path, tuple(x.shape), tuple(reference.shape), opset, fused, ops, dynamic=dynamic)
    if check:
        probes = [(x, reference)]
        if dynamic:  # another batch and another size than the traced ones, with odd multiples of the strides
            other = torch.randn(batch + 1, 3, input_size[0] + 32, input_size[1] + 96,
                                generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                probes.append((other, model(other)))
        result.max_abs_diff, result.argmax_agreement = _compare_with_onnxruntime(path, probes)
    return result


def _checked_onnx(exporter: str, opset: int) -> ModuleType:
    """The ``onnx`` module, once the exporter, the packages it needs and the opset are known to fit (one-line
    errors)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"ONNX export needs the onnx package: {ONNX_EXTRA}") from err
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ImportError(f"the dynamo exporter needs onnxscript: {ONNX_EXTRA}") from err
    from torch.onnx import _constants

    # The models resize by computed sizes (opset 11's Resize); each exporter has its own newest opset.
    low, high = (18, _constants.ONNX_MAX_OPSET) if exporter == "dynamo" else \
        (11, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    if not low <= opset <= high:
        raise ValueError(f"the {exporter} exporter writes these models at opsets {low} to {high}, not {opset}: e.g. "
                         f"--opset {max(low, 17)}")
    return onnx


def _compare_with_onnxruntime(path: Path, probes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """The graph at ``path`` run by onnxruntime on each (input, PyTorch logits) probe: the largest absolute
    difference and the lowest fraction of positions where both pick the same class."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(f"checking the export needs onnxruntime: {ONNX_EXTRA} (or check=False)") from err
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs, agree = [], []
    for inp, ref in probes:
        out = session.run(None, {"image": inp.numpy()})[0]
        if out.shape != tuple(ref.shape):
            raise RuntimeError(f"the exported graph gives {out.shape} for input {tuple(inp.shape)}, PyTorch "
                               f"{tuple(ref.shape)}")
        diffs.append(float(abs(out - ref.numpy()).max()))
        agree.append(float((out.argmax(1) == ref.numpy().argmax(1)).mean()))
    return max(diffs), min(agree)


def _check_dynamic(model: nn.Module, pool_stride: int | None, exporter: str) -> None:
    name = getattr(model, "model_name", type(model).__name__)
    if pool_stride is not None:
        raise ValueError(f"{name} cannot export with free sizes: its token pooling to a size-dependent grid has no "
                         "ONNX form; export at the size you deploy (--size H W)")
    if next(dynamic_gates(model), None) is not None:  # DGL gates: the per-image plan is traced at one shape
        raise ValueError(f"{name} cannot export with free sizes: its DGL gates are traced at one shape; export at the "
                         "size you deploy (--size H W)")
    if exporter != "torchscript":
        raise ValueError("--dynamic exports with the TorchScript exporter (torch.export cannot capture SegFormer with "
                         "free sizes): drop --exporter dynamo")


def model_metadata(model: nn.Module) -> dict[str, str]:
    """What a runtime needs beside the graph, as ONNX ``metadata_props`` (onnxruntime:
    ``session.get_modelmeta().custom_metadata_map``): the model's name, the input normalisation the graph expects
    (RGB, 0–255, ``(x − mean) / std``), what the logits are, and the test resize and sliding window, class names
    and palette when the model has them (``export_onnx`` adds ``logits_stride``)."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = getattr(model, "input_mean", IMAGENET_MEAN), getattr(model, "input_std", IMAGENET_STD)
    meta = {"edgeseg_model": str(getattr(model, "model_name", type(model).__name__)),
            "input_mean_rgb": json.dumps(list(mean)), "input_std_rgb": json.dumps(list(std)),
            "logits": "(batch, classes, ceil(H/logits_stride), ceil(W/logits_stride)): upsample bilinearly "
                      "(align_corners=False) to (H, W), then argmax over classes"}
    if getattr(model, "test_scale", None):  # the recipe's keep-ratio test resize bound (long, short)
        meta["test_scale"] = json.dumps(list(model.test_scale))
        meta["test_size_divisor"] = json.dumps(getattr(model, "test_size_divisor", None))
    if getattr(model, "test_crop_size", None):  # the recipe slides windows of this size (H, W) every stride pixels
        meta["test_crop_size"] = json.dumps(list(model.test_crop_size))
        meta["test_stride"] = json.dumps(list(model.test_stride))
        meta["logits"] += ("; the recipe evaluates windows of test_crop_size every test_stride pixels (the last one "
                           "moved back inside the image), averaging their upsampled logits")
    if getattr(model, "class_names", None):
        meta["class_names"] = json.dumps(list(model.class_names))
    if getattr(model, "palette", None):
        meta["palette"] = json.dumps([list(c) for c in model.palette])
    return meta


def _write_metadata(onnx, path: str, meta: dict[str, str]) -> None:
    graph = onnx.load(path)
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, path)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: str, opset: int) -> None:
    # Quiet torch's own chatter, which is not the user's concern: its op registry logs "torchvision is not installed.
    # Skipping torchvision::nms" and its pytree internals raise FutureWarnings.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["image"],
                                        output_names=["logits"], verbose=False)
    finally:
        registry.setLevel(level)
    program.save(path)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


__all__ = ["EXPORTERS", "ExportResult", "export_onnx", "model_metadata"]
