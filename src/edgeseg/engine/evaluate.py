"""Evaluate a model on a dataset: mmseg's test protocol (see ``inference.py``) feeding one dataset-level
confusion matrix (see ``metrics.py``). Under DDP each process takes every ``world``-th image and the matrices are
summed, so the result equals a single-process run."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config, EvalCfg
from ..data import SegDataset, TestTransform, build_dataset
from .inference import tta_probs, whole_labels
from .metrics import ConfusionMatrix, sum_over_processes


def build_val_dataset(cfg: Config) -> SegDataset:
    """The validation split with the config's single-scale test pipeline."""
    d = cfg.data
    transform = TestTransform(scale=d.test_scale, size_divisor=d.size_divisor, mean=d.mean, std=d.std)
    return build_dataset(d.dataset, d.root, d.val_split, transform, **{**d.kwargs, **d.val_kwargs})


class _Views(Dataset):
    """Each sample as the list of test views the protocol needs: the dataset's own transform, or with TTA one
    keep-ratio resize per ratio of the base ``img_scale`` (mmseg ``MultiScaleFlipAug``: ``int(scale · ratio)``)."""

    def __init__(self, dataset: SegDataset, indices: list[int], protocol: EvalCfg) -> None:
        self.dataset, self.indices = dataset, indices
        self.transforms: list[TestTransform] | None = None
        if protocol.tta:
            base = dataset.transform
            if not isinstance(base, TestTransform):
                raise ValueError("TTA needs a dataset built with a TestTransform (it is rescaled per ratio)")
            self.transforms = [TestTransform((int(base.scale[0] * r), int(base.scale[1] * r)), base.size_divisor,
                                             base.mean, base.std) for r in protocol.tta_ratios]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        if self.transforms is None:
            item = self.dataset[index]
            return {"views": [item["img"]], "gt": item["gt"], "name": item["meta"]["name"], "index": index}
        img, gt = self.dataset.load_pair(index)
        views = [t(img)[0] for t in self.transforms]
        return {"views": views, "gt": torch.as_tensor(gt), "name": self.dataset.sample_name(index), "index": index}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: SegDataset, protocol: EvalCfg, workers: int = 0,
             progress: bool = False, callback: Any = None) -> dict[str, Any]:
    """mIoU/mAcc/aAcc (percent) and per-class IoU/Acc over ``dataset`` with ``protocol``'s mode (whole/slide) and TTA
    (a recipe's ``eval`` section).

    Returns ``{"mIoU", "mAcc", "aAcc", "per_class": {name: {"IoU", "Acc"}}, "num_images"}``; an undefined per-class
    value (class absent from labels and predictions) is ``None``. ``callback(name, pred, gt)``, if given, sees every
    prediction (e.g. to save overlays).
    """
    net = getattr(model, "module", model)  # DDP: run the wrapped module, no gradient hooks needed
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    rank, world = _dist()
    views = _Views(dataset, list(range(rank, len(dataset), world)), protocol)
    # own generator: evaluating must not advance torch's global RNG (training continues from it)
    loader = DataLoader(views, batch_size=None, shuffle=False, num_workers=workers, generator=torch.Generator())
    num_classes = getattr(net, "num_classes", None) or dataset.num_classes
    cm = ConfusionMatrix(num_classes, dataset.ignore_index)
    if progress and rank == 0:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", total=len(views), dynamic_ncols=True, leave=False)
    flip = protocol.tta and protocol.tta_flip
    foreign: str | None = None  # the first label file holding a value that is neither a class nor ignore
    for item in loader:
        gt = item["gt"]
        if len(item["views"]) == 1 and not flip and protocol.mode == "whole":
            # one view: its probabilities' argmax is its logits' (softmax is monotonic), in one native pass
            pred = whole_labels(net, item["views"][0][None].to(device), gt.shape[-2:])[0].cpu()
        else:
            probs = tta_probs(net, [v[None].to(device) for v in item["views"]], gt.shape[-2:], protocol.mode,
                              protocol.crop_size, protocol.stride, add_flipped=flip)
            pred = probs.argmax(dim=1)[0].cpu()
        seen = int(cm.hist[num_classes].sum())
        cm.update(pred, gt)
        if foreign is None and int(cm.hist[num_classes].sum()) > seen:
            foreign = dataset.label_path(int(item["index"])) or f"of image {item['name']}"
        if callback is not None:
            callback(item["name"], pred, gt)
    cm.all_reduce()
    if rank == 0 and int(cm.hist[num_classes].sum()):  # mmseg scores them silently; training refuses them
        warnings.warn(f"the label {foreign or 'of an image another process scored'} (and maybe others) holds values "
                      f">= {num_classes} that are not the ignore value {dataset.ignore_index}: scored as mmseg scores "
                      f"them (in the predicted class's area only); fix those masks or map the values to "
                      f"{dataset.ignore_index}", stacklevel=2)
    net.train(was_training)
    num_images = int(sum_over_processes(torch.tensor(len(views))))
    return format_metrics(cm.compute(), dataset.classes, num_images)


def format_metrics(metrics: dict[str, Any], class_names: Any, num_images: int) -> dict[str, Any]:
    """Fractions → percent, NaN → None, per-class values keyed by class name."""

    def pct(x: float) -> float | None:
        return None if math.isnan(x) else 100.0 * float(x)

    names = list(class_names) if class_names else [str(i) for i in range(len(metrics["IoU"]))]
    return {
        "mIoU": pct(metrics["mIoU"]), "mAcc": pct(metrics["mAcc"]), "aAcc": pct(metrics["aAcc"]),
        "per_class": {n: {"IoU": pct(iou), "Acc": pct(acc)} for n, iou, acc in zip(names, metrics["IoU"],
                                                                                    metrics["Acc"])},
        "num_images": num_images,
    }


def metrics_table(result: dict[str, Any]) -> str:
    """A per-class table and the summary line, as text."""
    width = max([5] + [len(n) for n in result["per_class"]])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    fmt = lambda v: "   n/a" if v is None else f"{v:6.2f}"  # noqa: E731
    for name, v in result["per_class"].items():
        lines.append(f"{name:<{width}}  {fmt(v['IoU'])}  {fmt(v['Acc'])}")
    lines.append(f"mIoU {fmt(result['mIoU']).strip()}   mAcc {fmt(result['mAcc']).strip()}   "
                 f"aAcc {fmt(result['aAcc']).strip()}   ({result['num_images']} images)")
    return "\n".join(lines)
