"""The training loop: build data, model, optimizer and schedule; iterate; evaluate; checkpoint.

Single process (``edgeseg train CONFIG``) or DDP (``torchrun --nproc-per-node N -m edgeseg train CONFIG``: gloo on
CPU, NCCL on GPUs). What the loop reproduces from the official runs: per-iteration poly + warm-up schedule,
AdamW groups (``optim.py``), the loss on logits upsampled to the label size, mean over *all* label pixels.

Exact resumption: a resumed run computes the same losses as an uninterrupted one. Everything random is a function
of (seed, position): the data stream (:class:`InfiniteBatchSampler`) and each sample's augmentation
(:class:`SeededTrainSet`) depend only on the global sample position; the model's own randomness (dropout, drop
path) uses torch's generator, whose state is saved per rank with the optimizer, scaler and iteration.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, set_labels, set_test_recipe
from ..config import Config
from ..data import SegDataset, TrainTransform, build_dataset, collate
from ..fileio import write_text
from ..models import REGULARISATION_ARGS, create_model
from .evaluate import build_val_dataset, evaluate
from .optim import build_optimizer, set_lr


# ------------------------------------------------------------------------------------------------ data stream
class InfiniteBatchSampler:
    """Endless batches of ``(dataset index, global position)`` for process ``rank`` of ``world``.

    The global stream is epoch after epoch of ``randperm(len)``, each drawn from a generator seeded with
    ``seed · 100003 + epoch`` (distinct for each seed and epoch below 100003); global position ``g`` belongs to rank
    ``g % world``. Micro-batch ``b`` of every rank together covers positions ``[b·B·world, (b+1)·B·world)``, so the
    images of an optimizer step do not depend on how they are split over processes, and resuming at micro-batch
    ``start`` needs no replay.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if size < 1:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _index(self, g: int) -> int:
        epoch, offset = divmod(g, self.size)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            first = b * self.batch_size
            positions = [(first + j) * self.world + self.rank for j in range(self.batch_size)]
            yield [(self._index(g), g) for g in positions]
            b += 1


class SeededTrainSet(Dataset):
    """``dataset`` with ``transform`` applied under a generator seeded by (seed, global position): the same draw
    gets the same crop, flip and colour jitter in any process, worker or resumed run."""

    def __init__(self, dataset: SegDataset, transform: TrainTransform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = key
        img, gt = self.dataset.load_pair(index)
        x, y, _ = self.transform(img, gt, rng=np.random.default_rng([self.seed, position]))
        return {"img": x, "gt": y, "meta": {"index": index, "img_path": self.dataset.img_path(index),
                                           "label_path": self.dataset.label_path(index),
                                           "reduce_zero_label": bool(getattr(self.dataset, "reduce_zero_label", 0))}}


# -------------------------------------------------------------------------------------------------- processes
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group, so it also destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """``train.device`` (auto | cpu | cuda) as a torch device: ``auto`` takes the GPU when torch sees one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no GPU: use --set train.device=cpu")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev, owns)


def grad_scaler(cfg: Config, info: DistInfo) -> torch.amp.GradScaler:
    """Loss scaling for ``train.amp=fp16`` on CUDA, where small fp16 gradients would underflow to 0; otherwise a
    disabled scaler that passes losses, steps and (empty) state straight through."""
    return torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16" and info.device.type == "cuda")


def sync_batchnorm(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """``train.sync_bn``: BatchNorm statistics over every process's batch, where torch can (CUDA + DDP)."""
    if cfg.train.sync_bn and info.world > 1:
        if info.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if info.main:
            warnings.warn("train.sync_bn: SyncBatchNorm needs CUDA; on CPU each process normalises its own batch",
                          stacklevel=3)
    return model


def data_parallel(module: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` under DDP (gradients averaged over processes in backward) when there are several, else itself."""
    if info.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == "cuda"
                                               else None, find_unused_parameters=find_unused_parameters)


def leave_process_group(info: DistInfo) -> None:
    """Wait for every rank (rank 0 may still be writing), then destroy the group if this run created it."""
    if info.world > 1:
        dist.barrier()
        if info.owns_group:
            dist.destroy_process_group()


def _all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """This process's generators in a form ``torch.load(weights_only=True)`` accepts (tensors, lists, ints)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [list(keys), version, gauss],
        "numpy": [int(v) for v in np_state[1]] + [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    keys, version, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_keys = np.array(state["numpy"][:624], dtype=np.uint32)
    pos, has_gauss, cached = state["numpy"][624:]
    np.random.set_state(("MT19937", np_keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ parts
def check_labels(batch: dict[str, Any], num_classes: int, ignore_index: int = 255) -> None:
    """Every label of a training batch is a class of the model or ignored; else one line naming the label file to
    fix (the loss would fail deep inside, or on a GPU with a device-side assert)."""
    gt = batch["gt"]
    bad = ((gt >= num_classes) | (gt < 0)) & (gt != ignore_index)
    if bad.any():
        i = int(bad.flatten(1).any(1).nonzero()[0])
        meta = batch["meta"][i] if isinstance(batch.get("meta"), list) else {}
        label = f"label {meta['label_path']}" if meta.get("label_path") else \
            f"label map of {meta.get('img_path', f'image {i} of the batch')}"
        value = int(gt[i][bad[i]][0])
        # the value as the file holds it: reduce_zero_label moved it down by one
        held = f"value {value + 1} (class {value} after reduce_zero_label)" if meta.get("reduce_zero_label") else \
            f"class {value}"
        raise ValueError(f"the {label} holds {held}, but the model has {num_classes} classes (and {ignore_index} "
                         f"ignored): set model.num_classes to the dataset's class count, or fix the masks")


def class_list_origin(cfg: Config, split: str = "train") -> str:
    """Where the class names of the recipe's ``split`` come from, for messages: the recipe key that lists them, a
    folder dataset's ``dataset.yaml``, or a built-in dataset's name."""
    d = cfg.data
    split_kwargs = getattr(d, f"{split}_kwargs")
    if "classes" in split_kwargs or "classes" in d.kwargs:
        return f"data.{f'{split}_kwargs' if 'classes' in split_kwargs else 'kwargs'}.classes"
    if d.dataset == "folder":
        return str(Path(d.root) / {**d.kwargs, **split_kwargs}.get("meta_file", "dataset.yaml"))
    return f"dataset {d.dataset}"


def check_class_count(cfg: Config, dataset: SegDataset, count: int, claim: str, fix: str,
                      split: str = "train") -> None:
    """A model of ``count`` classes (``claim`` says whose) is one of the dataset's class count, else one line
    naming where the class list comes from: training would go on with labels and class names that disagree, and
    ``eval`` would refuse the result."""
    if count != dataset.num_classes:
        raise ValueError(f"{claim} but {class_list_origin(cfg, split)} lists {dataset.num_classes} classes: {fix}")


def check_num_classes(cfg: Config, train_set: SegDataset) -> None:
    """``model.num_classes``, where the recipe sets it, is the training set's class count."""
    if cfg.model.num_classes is not None:
        fix = f"set model.num_classes to {train_set.num_classes}"
        if cfg.data.dataset == "folder":  # a class list of the user's own
            fix += ", or fix the class list"
        check_class_count(cfg, train_set, cfg.model.num_classes, f"model.num_classes is {cfg.model.num_classes}", fix)


def seg_loss(logits: Tensor, gt: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of logits (B, K, h, w) upsampled to the label size (B, H, W).

    Averaged over *all* pixels, ignored ones included (mmseg ≤ 0.23 ``weight_reduce_loss`` without
    ``avg_non_ignore``, the version both papers trained with): kept, it sets the gradient scale of the recipes.
    """
    logits = F.interpolate(logits.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, gt, ignore_index=ignore_index, reduction="none").mean()


def build_model(cfg: Config, num_classes: int, log: Any = print) -> nn.Module:
    """``create_model`` from the config, plus the weights ``model.pretrained`` names: an ImageNet backbone, or a
    segmentation model of the same architecture (its classifier too where the class count agrees)."""
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or num_classes, **cfg.model.overrides)
    if cfg.model.pretrained:
        if not Path(cfg.model.pretrained).exists():
            raise FileNotFoundError(f"model.pretrained '{cfg.model.pretrained}' not found: download the ImageNet "
                                    f"weights the config names, or train from scratch with --set model.pretrained=null")
        # A starting point: another dataset's segmentation model gives all but its classifier (mmseg's load_from).
        report = load_checkpoint(model, cfg.model.pretrained, strict=False, drop_head=True)
        log(f"pretrained weights from {cfg.model.pretrained}:\n{report}")
    return model


def build_train_set(cfg: Config) -> SegDataset:
    """The training split without a transform (:class:`SeededTrainSet` applies the pipeline)."""
    d = cfg.data
    return build_dataset(d.dataset, d.root, d.train_split, None, **{**d.kwargs, **d.train_kwargs})


def build_train_loader(cfg: Config, dataset: SegDataset, info: DistInfo, start_batch: int) -> DataLoader:
    """Micro-batches of ``data.batch_size / (processes · grad_accum)`` images, from micro-batch ``start_batch``."""
    d = cfg.data
    per_step = info.world * cfg.train.grad_accum
    if d.batch_size % per_step:
        raise ValueError(f"data.batch_size {d.batch_size} (total per optimizer step) is not divisible by "
                         f"processes × train.grad_accum = {per_step}: change one of them")
    transform = TrainTransform(d.crop_size, d.scale, d.ratio_range, d.cat_max_ratio, d.flip_prob, d.photometric,
                               d.mean, d.std, dataset.ignore_index)
    sampler = InfiniteBatchSampler(len(dataset), d.batch_size // per_step, cfg.train.seed, info.rank, info.world,
                                   start_batch)
    loader = DataLoader(SeededTrainSet(dataset, transform, cfg.train.seed), batch_sampler=sampler,
                        num_workers=d.workers, collate_fn=collate, pin_memory=info.device.type == "cuda",
                        persistent_workers=d.workers > 0,
                        generator=torch.Generator())  # own generator: creating the iterator must not draw from torch's
    return loader


def autocast_context(amp: str, device: torch.device) -> AbstractContextManager:
    """The mixed-precision context of ``train.amp`` (none | bf16 | fp16) around forward pass and loss on ``device``.

    Backward runs outside it, as torch's AMP recipe asks. fp16 is refused off CUDA, where ``train`` has no
    GradScaler to keep its small gradients from underflowing.
    """
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use --set train.amp=bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class RunLogger:
    """One JSON row per call appended to ``work_dir/log.jsonl`` (+ TensorBoard scalars when it is installed).

    Only the main process logs (``enabled``): every rank computes the same rows, one file is enough. Numeric
    fields become scalars under ``<mode>/<field>`` at step ``row["iter"]``.

    The log is the run's own, as its checkpoints are: a run that starts at iteration ``start`` keeps the rows up
    to it and drops the rest, so a fresh run in a used work dir starts an empty log, and a run resumed from an
    earlier checkpoint does not repeat the rows after it (TensorBoard hides its later scalars likewise). The log it
    replaces is kept whole as ``log.prev.jsonl``.
    """

    def __init__(self, work_dir: Path, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        self.file, self.tb = None, None
        if not enabled:
            return
        path = work_dir / "log.jsonl"
        kept = _rows_until(path, start)
        if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) > len(kept):
            os.replace(path, path.with_name("log.prev.jsonl"))  # what it drops stays readable, until the next run
        write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"), purge_step=start + 1)
        except ImportError:
            pass

    def __call__(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("iter",):
                    self.tb.add_scalar(f"{row.get('mode', 'train')}/{k}", v, row["iter"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _rows_until(path: Path, start: int) -> list[str]:
    """The lines of the log at ``path`` (if any) whose row is at iteration ``start`` or before; a line cut short
    by a crash is dropped."""
    if start == 0 or not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iter"] <= start:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def open_work_dir(cfg: Config, work_dir: str | Path) -> Path:
    """Create ``work_dir`` and write the run's full config to ``config.yaml`` (what ``--set`` changed included)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(work_dir / "config.yaml")
    return work_dir


def data_summary(train_set: SegDataset, val_set: SegDataset | None) -> str:
    """How many images the run found, said at its start (mmseg's "Loaded N images"): a wrong split or suffix
    shows there, not after hours."""
    val = f"{len(val_set)} validation images" if val_set is not None else "no validation (train.eval_interval=0)"
    return f"data: {len(train_set)} training images, {val}"


def evaluate_during_training(model: nn.Module, val_set: SegDataset, cfg: Config) -> dict[str, Any]:
    """``evaluate`` on the validation split with the config's protocol (which leaves the model in the mode it found).

    At most 2 loader workers: the training loader's persistent workers stay alive meanwhile.
    """
    return evaluate(model, val_set, cfg.eval, workers=min(cfg.data.workers, 2))


def find_resume(resume: str | None, work_dir: Path, command: str = "train") -> Path | None:
    """``--resume``: None, ``"auto"`` (``work_dir/latest.pth`` if present) or a checkpoint path that must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = work_dir / "latest.pth"
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        raise ValueError(f"--resume {resume} is a folder: pass {path / 'latest.pth'}, or --resume auto with "
                         f"--work-dir {resume}")
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint; pass a .pth written by edgeseg {command} "
                                f"or 'auto'")
    return path


def read_training_state(path: Path, fix: str) -> dict[str, Any]:
    """A checkpoint that holds training state (``save_training_state``); ``fix`` ends the error for weights only."""
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt:
        raise ValueError(f"--resume {path}: holds no training state (optimizer, iteration); {fix}")
    return ckpt


def restore_weights(model: nn.Module, ckpt: dict[str, Any], path: Path) -> None:
    """The run's weights from a training-state checkpoint; one line where the recipe builds another model: other
    weights, or the same weights built with other arguments (a dynamic model's sparsity leaves no trace in them)."""
    other = ValueError(f"--resume {path}: written for {ckpt.get('model_name')} {ckpt.get('model_args')}, but the "
                       f"recipe builds {model.model_name} {model.model_args}: resume with the config that run "
                       f"started with, or train in a new --work-dir")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise other from err

    def plain(name: Any, args: Any) -> str:  # as JSON: a tuple and a list are the same argument
        args = {k: v for k, v in (args or {}).items() if k not in REGULARISATION_ARGS}
        return json.dumps([name, args], sort_keys=True, default=str)

    if plain(ckpt.get("model_name"), ckpt.get("model_args")) != plain(model.model_name, model.model_args):
        raise other


def restore_rng(states: list[dict[str, Any]], info: DistInfo) -> None:
    """Continue this rank's generators from a checkpoint's per-rank list."""
    if len(states) != info.world:
        warnings.warn(f"resuming with {info.world} processes from a {len(states)}-process run: the data stream "
                      f"is identical, dropout draws are not", stacklevel=3)
    set_rng_state(states[info.rank % len(states)])


def save_training_state(work_dir: Path, model: nn.Module, state: dict[str, Any], info: DistInfo,
                        keep: int = 0) -> None:
    """``iter_<state["iteration"]>.pth``: weights, ``state`` and every rank's generators; then ``latest.pth``.
    With ``keep`` > 0 (``train.max_keep_checkpoints``) only the newest ``keep`` of the ``iter_*.pth`` up to this one
    stay: a long run at SegFormer-B5's size would otherwise leave gigabytes of them.

    Collective: every rank calls it (the generators are gathered), rank 0 writes.
    """
    rng = _all_gather_object(rng_state(), info)  # each rank resumes its own
    if info.main:
        path = save_checkpoint(work_dir / f"iter_{state['iteration']}.pth", model,
                               {**state, "rng": rng, "world_size": info.world})
        _replace_copy(path, work_dir / "latest.pth")
        if keep > 0:
            prune_checkpoints(work_dir, state["iteration"], keep)


def prune_checkpoints(work_dir: Path, iteration: int, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_N.pth`` with N ≤ ``iteration``; returns the deleted paths.

    Later iterations are left alone: they belong to an earlier run, which a user may still want, not to this one;
    an earlier run's lower ones count among the ``keep`` (mmseg also prunes by name). ``latest.pth`` is a hard link
    or a copy, so it survives its ``iter_N.pth``."""
    numbered = sorted((int(m[1]), p) for p in work_dir.glob("iter_*.pth")
                      if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name)) and int(m[1]) <= iteration)
    stale = [p for _, p in numbered[:-keep]]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------------------------------------- loop
def train(cfg: Config, work_dir: str | Path, resume: str | None = None, progress: bool = True,
          log: Any = print) -> dict[str, Any]:
    """Train ``cfg`` in ``work_dir`` (created); ``resume`` is None, ``"auto"`` (latest.pth if present) or a path.

    Returns ``{"model", "iteration", "best_mIoU", "last_eval", "rank"}`` on every rank (``model`` unwrapped from DDP).
    """
    if cfg.distill is not None:  # a DynaSegFormer recipe: its weights come from a teacher, not from scratch
        raise ValueError("this config has a distill: section (a DynaSegFormer recipe): run it with "
                         "`edgeseg distill CONFIG --teacher CKPT`")
    info = init_distributed(cfg.train.device)
    work_dir = Path(work_dir)  # created once the run can start: a refused run leaves no folder behind
    log = log if info.main else (lambda *a, **k: None)

    # Identical initial weights on every rank (DDP also broadcasts rank 0's); then per-rank streams for dropout.
    seed_everything(cfg.train.seed)
    train_set = build_train_set(cfg)
    check_num_classes(cfg, train_set)
    model = set_labels(build_model(cfg, train_set.num_classes, log), train_set.classes, train_set.palette)
    set_test_recipe(model, cfg)  # normalisation, test resize and window travel with the checkpoints
    ignore_index = train_set.ignore_index
    model = sync_batchnorm(model, cfg, info).to(info.device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = grad_scaler(cfg, info)
    seed_everything(cfg.train.seed + info.rank)

    start, best_miou = 0, -math.inf
    ckpt_path = find_resume(resume, work_dir)
    if ckpt_path is not None:
        ckpt = read_training_state(ckpt_path, "to start from its weights set model.pretrained instead")
        restore_weights(model, ckpt, ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best_miou = int(ckpt["iteration"]), float(ckpt.get("best_mIoU", -math.inf))
        if start > cfg.schedule.iters:
            raise ValueError(f"--resume {ckpt_path}: written at iteration {start}, past schedule.iters="
                             f"{cfg.schedule.iters}: resume with the schedule the run started with")
        restore_rng(ckpt["rng"], info)
        log(f"resumed from {ckpt_path} at iteration {start}")
    elif resume == "auto":
        log(f"no checkpoint in {work_dir}: starting from scratch")

    # The official configs need find_unused_parameters=True for SegFormer's never-used conv_seg; edgeseg's
    # models do not build it, every parameter receives a gradient, so DDP skips that graph traversal.
    net = data_parallel(model, info)

    accum, iters, dev = cfg.train.grad_accum, cfg.schedule.iters, info.device
    batches = iter(build_train_loader(cfg, train_set, info, start_batch=start * accum))
    val_set = build_val_dataset(cfg) if cfg.train.eval_interval > 0 else None
    log(data_summary(train_set, val_set))
    if info.main:
        open_work_dir(cfg, work_dir)
    logger = RunLogger(work_dir, info.main, start)
    bar = progress_bar(iters, start) if progress and info.main else None
    last_eval: dict[str, Any] | None = None
    loss_sum, loss_count, diverged_at, t_start = 0.0, 0, None, time.perf_counter()
    net.train()

    def loss_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        check_labels(batch, model.num_classes, ignore_index)
        return {"loss": seg_loss(net(batch["img"].to(dev)), batch["gt"].to(dev), ignore_index)}

    for it in range(start, iters):
        lr = set_lr(optimizer, it, cfg.optim.lr, cfg.schedule)
        loss = optimizer_step(net, batches, loss_of, optimizer, scaler, cfg, info)["loss"]
        loss_sum, loss_count, done = loss_sum + loss, loss_count + 1, it + 1
        if diverged_at is None and not math.isfinite(loss):
            diverged_at = done

        logs = done % cfg.train.log_interval == 0 or done == iters
        evaluates = val_set is not None and (done % cfg.train.eval_interval == 0 or done == iters)
        saves = (cfg.train.checkpoint_interval > 0 and done % cfg.train.checkpoint_interval == 0) or done == iters
        if logs or evaluates or saves:  # nothing diverged is logged, scored or saved (--resume auto would pick it)
            check_finite_loss(diverged_at, cfg, info)
        if logs:
            mean_loss = mean_over_ranks(loss_sum / loss_count, info)
            elapsed = time.perf_counter() - t_start
            logger({"mode": "train", "iter": done, "loss": mean_loss, "lr": lr, "time_s": round(elapsed, 3),
                    "eta_s": round(elapsed / (done - start) * (iters - done), 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            loss_sum, loss_count = 0.0, 0
        if bar is not None:
            bar.update(1)

        is_best = False
        if evaluates:
            last_eval = evaluate_during_training(net, val_set, cfg)
            logger({"mode": "val", "iter": done, **{k: last_eval[k] for k in ("mIoU", "mAcc", "aAcc")}})
            log(f"iter {done}: " + "  ".join(f"{k} {last_eval[k]:.2f}" if last_eval[k] is not None else f"{k} n/a"
                                           for k in ("mIoU", "mAcc", "aAcc")))
            if last_eval["mIoU"] is not None and last_eval["mIoU"] > best_miou:
                best_miou, is_best = last_eval["mIoU"], True

        if info.main and is_best:
            save_checkpoint(work_dir / "best.pth", model, {"iteration": done, "mIoU": best_miou,
                                                           "config": cfg.to_dict()})
        if saves:
            save_training_state(work_dir, model, {
                "iteration": done, "best_mIoU": best_miou, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": cfg.to_dict()}, info, cfg.train.max_keep_checkpoints)

    if bar is not None:
        bar.close()
    logger.close()
    leave_process_group(info)
    return {"model": model, "iteration": iters, "best_mIoU": best_miou if best_miou > -math.inf else None,
            "last_eval": last_eval, "rank": info.rank}


def optimizer_step(net: nn.Module, batches: Iterator[dict[str, Any]],
                   loss_of: Callable[[dict[str, Any]], dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, cfg: Config, info: DistInfo) -> dict[str, float]:
    """One optimizer step over ``train.grad_accum`` micro-batches drawn from ``batches``, shared by training and
    distillation: ``loss_of(batch)`` (run under the configured autocast) returns named losses, of which ``"loss"``
    is back-propagated. Returns each loss averaged over the micro-batches."""
    accum, sums = cfg.train.grad_accum, {}
    for micro in range(accum):
        batch = next(batches)
        skip_sync = info.world > 1 and micro < accum - 1  # DDP: all-reduce gradients on the last micro-step only
        with net.no_sync() if skip_sync else nullcontext():
            with autocast_context(cfg.train.amp, info.device):
                losses = loss_of(batch)
            scaler.scale(losses["loss"] / accum).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums


def check_finite_loss(diverged_at: int | None, cfg: Config, info: DistInfo) -> None:
    """Stop a diverged run with the fix, instead of training on to the end on NaN weights.

    ``diverged_at``: the first step this process saw a non-finite loss (each step's loss reaches the host anyway,
    so noting it costs no device sync), or None. Called before every log row, evaluation and checkpoint, the same
    steps on every rank: one collective there agrees on the earliest such step, so all ranks stop together and no
    checkpoint of NaN weights is written for ``--resume auto`` to pick up."""
    first = math.inf if diverged_at is None else float(diverged_at)
    if info.world > 1:
        t = torch.tensor(first, dtype=torch.float64, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first = float(t)
    if first == math.inf:
        return
    fix = f"lower optim.lr (now {cfg.optim.lr:g})"
    if cfg.train.amp != "none":  # half precision overflows first
        fix += f", or train in {'bf16 or ' if cfg.train.amp == 'fp16' else ''}fp32 (--set train.amp=none)"
    raise ValueError(f"the training loss is not finite from iteration {int(first)}: the run diverged; {fix}, and "
                     f"start again or resume from a checkpoint before it")


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> Any:
    """A tqdm bar over optimizer steps (tqdm imported here: only runs with a bar need it)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """A logged scalar averaged over every process (collective under DDP)."""
    if info.world == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t) / info.world


def _replace_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` atomically (hard link when the file system allows, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


__all__ = ["InfiniteBatchSampler", "RunLogger", "SeededTrainSet", "autocast_context", "build_model",
           "evaluate_during_training", "open_work_dir", "progress_bar", "resolve_device", "seg_loss", "train"]
