"""The training loop on tiny procedural scenes: artefacts, exact resumption, data stream, DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from edgeseg.checkpoint import load_model, set_test_recipe
from edgeseg.config import load_config
from edgeseg.data.classes import SCENES_CLASSES, SCENES_PALETTE
from edgeseg.engine.evaluate import build_val_dataset
from edgeseg.engine.train import InfiniteBatchSampler, seg_loss, train


def tiny_cfg(*extra: str):
    return load_config(None, [
        "model.name=topformer-tiny", "data.dataset=scenes", "data.crop_size=[64,64]", "data.scale=[128,64]",
        "data.test_scale=[128,64]", "data.batch_size=4", "data.workers=0",
        "data.train_kwargs={num_images: 12, size: [64, 64]}", "data.val_kwargs={num_images: 2, size: [64, 64]}",
        "optim.lr=1e-3", "schedule.iters=4", "schedule.warmup_iters=1", "train.log_interval=1",
        "train.eval_interval=2", "train.checkpoint_interval=2", *extra])


def _losses(work_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if r["mode"] == "train"}


def _assert_tensorboard_scalars_match(work_dir: Path, rows: list[dict]) -> None:
    """With the [tensorboard] extra (in [dev], so in CI), the run's scalars are in ``tb/`` as in ``log.jsonl``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the [tensorboard] extra is not installed in CI")
        return
    events = EventAccumulator(str(work_dir / "tb"))
    events.Reload()
    for mode, field in (("train", "loss"), ("val", "mIoU")):
        logged = [(r["iter"], r[field]) for r in rows if r["mode"] == mode]
        scalars = [(e.step, e.value) for e in events.Scalars(f"{mode}/{field}")]
        assert [s for s, _ in scalars] == [i for i, _ in logged]
        assert all(abs(v - w) <= 1e-5 * max(1.0, abs(w)) for (_, v), (_, w) in zip(scalars, logged))


def test_train_writes_artefacts_and_resumes_exactly(tmp_path):
    cfg = tiny_cfg()
    first = tmp_path / "uninterrupted"
    said = []
    out = train(cfg, first, progress=False, log=said.append)
    assert said[0] == "data: 12 training images, 2 validation images"
    for name in ("iter_2.pth", "iter_4.pth", "latest.pth", "best.pth", "log.jsonl", "config.yaml"):
        assert (first / name).is_file(), name
    rows = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["mode"] == "train"] == [1, 2, 3, 4]
    assert [r["iter"] for r in rows if r["mode"] == "val"] == [2, 4]
    # mmcv's poly (power 1, to 0 over 4 iterations) with a 1-iteration linear warm-up from ratio 1e-6, at the
    # 0-based iteration each logged step ran: 1e-3·1·1e-6, then 1e-3·(1 − it/4)
    assert [r["lr"] for r in rows if r["mode"] == "train"] == pytest.approx([1e-9, 7.5e-4, 5e-4, 2.5e-4], rel=1e-9)
    assert out["best_mIoU"] == max(r["mIoU"] for r in rows if r["mode"] == "val")
    _assert_tensorboard_scalars_match(first, rows)
    ckpt = torch.load(first / "iter_2.pth", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "edgeseg" and ckpt["iteration"] == 2 and "optimizer" in ckpt and len(ckpt["rng"]) == 1
    assert load_config(first / "config.yaml") == cfg
    rebuilt = load_model(first / "latest.pth")
    assert rebuilt.num_classes == 8
    assert rebuilt.class_names == list(SCENES_CLASSES) and rebuilt.palette == list(SCENES_PALETTE)
    final = torch.load(first / "latest.pth", map_location="cpu", weights_only=True)["state_dict"]

    # "crash" after iteration 2: a fresh work dir holding only that checkpoint as latest.pth, resume=auto
    second = tmp_path / "resumed"
    second.mkdir()
    shutil.copy(first / "iter_2.pth", second / "latest.pth")
    train(cfg, second, resume="auto", progress=False, log=lambda *a: None)
    resumed = _losses(second)
    assert list(resumed) == [3, 4]
    reference = _losses(first)
    assert all(resumed[i] == reference[i] for i in (3, 4)), (resumed, reference)
    after = torch.load(second / "latest.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(after[k], final[k]) for k in final)


def test_log_holds_only_this_run_after_a_resume_from_an_earlier_checkpoint_or_a_fresh_run(tmp_path):
    def rows() -> list[dict]:
        lines = (tmp_path / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "eta_s")} for line in lines]

    train(tiny_cfg(), tmp_path, progress=False, log=lambda *a: None)
    reference = rows()
    assert [(r["mode"], r["iter"]) for r in reference] == [("train", 1), ("train", 2), ("val", 2), ("train", 3),
                                                           ("train", 4), ("val", 4)]
    # back to iteration 2 of the same run: rows 3 and 4 are written again, not repeated
    train(tiny_cfg(), tmp_path, resume=str(tmp_path / "iter_2.pth"), progress=False, log=lambda *a: None)
    assert rows() == reference
    # a new run (no resume) in the used folder starts a new log
    train(tiny_cfg("schedule.iters=2"), tmp_path, progress=False, log=lambda *a: None)
    assert [(r["mode"], r["iter"]) for r in rows()] == [("train", 1), ("train", 2), ("val", 2)]
    _assert_tensorboard_scalars_match(tmp_path, rows())
    previous = [json.loads(line) for line in (tmp_path / "log.prev.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["iter"]) for r in previous] == [(r["mode"], r["iter"]) for r in reference]  # kept whole


def test_max_keep_checkpoints_keeps_the_newest_of_this_run(tmp_path):
    stale = tmp_path / "iter_100.pth"  # left by an earlier, longer run in the same folder
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"an earlier run")
    cfg = tiny_cfg("schedule.iters=6", "train.eval_interval=0", "train.max_keep_checkpoints=2")
    train(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.glob("iter_*.pth")) == ["iter_100.pth", "iter_4.pth", "iter_6.pth"]
    latest = torch.load(tmp_path / "latest.pth", map_location="cpu", weights_only=True)
    assert latest["iteration"] == 6
    # the default keeps every one, as mmseg does
    train(tiny_cfg("train.eval_interval=0"), tmp_path / "all", progress=False, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "all").glob("iter_*.pth")) == ["iter_2.pth", "iter_4.pth"]
    with pytest.raises(ValueError, match=r"train.max_keep_checkpoints must be >= 0, got -1"):
        tiny_cfg("train.max_keep_checkpoints=-1")


def test_resuming_another_model_or_training_on_foreign_labels_is_one_line(tmp_path):
    from edgeseg.engine.train import check_labels

    cfg = tiny_cfg("schedule.iters=2", "train.eval_interval=0")
    train(cfg, tmp_path / "tiny", progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"written for topformer-tiny .* but the recipe builds topformer-small"):
        train(tiny_cfg("model.name=topformer-small"), tmp_path / "tiny", resume="auto", progress=False,
              log=lambda *a: None)
    with pytest.raises(ValueError, match=r"written at iteration 2, past schedule.iters=1"):
        train(tiny_cfg("schedule.iters=1"), tmp_path / "tiny", resume="auto", progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"^model.num_classes is 5 but dataset scenes lists 8 classes: set "
                                         r"model.num_classes to 8$"):
        train(tiny_cfg("model.num_classes=5"), tmp_path / "five", progress=False, log=lambda *a: None)
    batch = {"gt": torch.tensor([[[0, 255]], [[4, 6]]]), "meta": [{"img_path": "a.jpg"}, {"img_path": "b.jpg"}]}
    with pytest.raises(ValueError, match=r"the label map of b.jpg holds class 6, but the model has 5 classes"):
        check_labels(batch, 5)
    check_labels(batch, 7)
    batch["meta"][1]["label_path"] = "ann/b.png"  # a file to fix: named, rather than its image
    with pytest.raises(ValueError, match=r"^the label ann/b.png holds class 6, but the model has 5 classes"):
        check_labels(batch, 5)
    batch["meta"][1]["reduce_zero_label"] = True  # the file holds 7, which became class 6
    with pytest.raises(ValueError, match=r"^the label ann/b.png holds value 7 \(class 6 after reduce_zero_label\), "):
        check_labels(batch, 5)


def test_a_class_list_of_another_length_than_model_num_classes_is_refused_at_start(tmp_path):
    from edgeseg.data import write_scenes

    root = write_scenes(tmp_path / "five", 4, 2, size=(64, 64))  # masks hold the 8 scene classes
    meta = yaml.safe_load((root / "dataset.yaml").read_text())
    (root / "dataset.yaml").write_text(yaml.safe_dump({**meta, "classes": meta["classes"][:5],
                                                      "palette": meta["palette"][:5]}))
    folder = ["data.dataset=folder", f"data.root={root}", "data.train_kwargs={}", "data.val_kwargs={}"]
    with pytest.raises(ValueError, match=rf"^model.num_classes is 8 but {re.escape(str(root / 'dataset.yaml'))} "
                                         rf"lists 5 classes: set model.num_classes to 5, or fix the class list$"):
        train(tiny_cfg(*folder, "model.num_classes=8"), tmp_path / "run", progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"^model.num_classes is 8 but data.kwargs.classes lists 5 classes"):
        train(tiny_cfg(*folder, "model.num_classes=8", "data.kwargs={classes: [a, b, c, d, e]}"), tmp_path / "run",
              progress=False, log=lambda *a: None)
    # the class count from the list: a mask beyond it is named at its first batch
    with pytest.raises(ValueError, match=r"^the label \S*scene_\d+.png holds class [5-7], but the model has 5 "
                                         r"classes"):
        train(tiny_cfg(*folder), tmp_path / "run", progress=False, log=lambda *a: None)


def test_bf16_and_grad_accum_run(tmp_path):
    cfg = tiny_cfg("train.amp=bf16", "train.grad_accum=2", "schedule.iters=2", "train.eval_interval=0",
                   "train.checkpoint_interval=0")
    said = []
    train(cfg, tmp_path, progress=False, log=said.append)
    assert said[0] == "data: 12 training images, no validation (train.eval_interval=0)"
    losses = _losses(tmp_path)
    assert list(losses) == [1, 2] and all(0 < v < 10 for v in losses.values())
    with pytest.raises(ValueError, match="not divisible"):
        train(tiny_cfg("train.grad_accum=3"), tmp_path / "bad", progress=False, log=lambda *a: None)
    assert not (tmp_path / "bad").exists()  # refused runs leave no work folder behind
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(cfg, tmp_path / "bad", resume=str(tmp_path / "missing.pth"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "bad").exists()


def test_a_diverging_run_stops_with_the_fix_and_its_log_stays_strict_json(tmp_path):
    from edgeseg.engine.train import DistInfo, check_finite_loss

    # lr 1e6: the loss grows to ~1e15 by iteration 3 and is NaN from iteration 4; checked at each log row (3, 6)
    # and before each checkpoint (every iteration here): no NaN weights are saved for --resume auto to pick up
    cfg = tiny_cfg("optim.lr=1e6", "schedule.iters=6", "train.log_interval=3", "train.eval_interval=0",
                   "train.checkpoint_interval=1")
    with pytest.raises(ValueError, match=r"^the training loss is not finite from iteration ([3-5]): the run "
                                         r"diverged; lower optim.lr \(now 1e\+06\), and start again or resume from "
                                         r"a checkpoint") as err:
        train(cfg, tmp_path, progress=False, log=lambda *a: None)
    first = int(re.search(r"from iteration (\d)", str(err.value)).group(1))
    latest = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert latest["iteration"] == first - 1  # the last checkpoint before the divergence
    assert all(torch.isfinite(v).all() for v in latest["state_dict"].values() if v.is_floating_point())

    def strict(constant: str) -> float:
        raise ValueError(f"{constant} in log.jsonl")

    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] in ([], [3])
    info = DistInfo()  # one process
    with pytest.raises(ValueError, match=r"from iteration 7: .*, or train in bf16 or fp32 \(--set train.amp=none\)"):
        check_finite_loss(7, tiny_cfg("train.amp=fp16"), info)
    check_finite_loss(None, cfg, info)


def test_seg_loss_averages_over_all_pixels_ignored_ones_included():
    """mmseg ≤ 0.23's reduction (no avg_non_ignore): the sum of the kept pixels' CE over every pixel of the map."""
    logits = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]], [[0.0, 1.0], [3.0, 0.5]]]])  # (1, 2 classes, 2, 2)
    gt = torch.tensor([[[0, 1], [255, 1]]])
    kept = [(0, 0, 0), (1, 0, 1), (1, 1, 1)]  # (class, row, col) of the three labelled pixels
    ce = [-torch.log_softmax(logits[0, :, r, c], 0)[k] for k, r, c in kept]
    assert torch.allclose(seg_loss(logits, gt), sum(ce) / 4)
    assert not torch.allclose(seg_loss(logits, gt), sum(ce) / 3)
    # logits at half the label size are upsampled bilinearly (align_corners=False) before the loss
    small = torch.tensor([[[[1.0]], [[-1.0]]]])
    assert torch.allclose(seg_loss(small, torch.zeros(1, 2, 2, dtype=torch.long)),
                          -torch.log_softmax(torch.tensor([1.0, -1.0]), 0)[0])


def test_sampler_stream_is_independent_of_world_size():
    def batches(world, rank, start=0, n=5, bs=3):
        return list(islice(InfiniteBatchSampler(7, bs, seed=1, rank=rank, world=world, start=start), n))

    single = batches(1, 0, bs=6)
    ranks = [batches(2, r) for r in (0, 1)]
    for b in range(5):  # micro-batch b of both ranks = the single-process batch b, same positions
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(single[b])
    positions = [g for batch in single for _, g in batch]
    assert positions == list(range(30))
    epoch0 = [i for batch in single for i, g in batch if g < 7]
    assert sorted(epoch0) == list(range(7))  # each epoch is a permutation
    assert batches(1, 0, start=2, n=3, bs=6) == single[2:]  # resuming needs no replay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, work_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = tiny_cfg("schedule.iters=3", "train.eval_interval=3", "train.checkpoint_interval=0")
    result = train(cfg, work_dir, progress=False, log=lambda *a: None)
    torch.save({"state_dict": result["model"].state_dict(), "mIoU": result["last_eval"]["mIoU"],
                "num_images": result["last_eval"]["num_images"]}, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_two_processes_stay_identical(tmp_path):
    # spawn, not fork: a fork of this multi-threaded test process (OpenMP, onnxruntime and tqdm threads from earlier
    # tests) can deadlock a child; torchrun starts fresh processes too. A hang fails the test after two minutes.
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "work"), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    params = {k for k in r0["state_dict"] if "running" not in k and "num_batches" not in k}
    assert params and all(torch.equal(r0["state_dict"][k], r1["state_dict"][k]) for k in params)
    # each rank normalised its own shard: BN running statistics differ, so the shards really differed
    assert any(not torch.equal(r0["state_dict"][k], r1["state_dict"][k])
               for k in r0["state_dict"] if "running_mean" in k)
    assert r0["mIoU"] == r1["mIoU"]  # confusion matrices summed over both shards
    assert r0["num_images"] == r1["num_images"] == len(build_val_dataset(tiny_cfg()))  # and the image counts
    rows = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["mode"] == "train"] == [1, 2, 3]  # rank 0 alone logs
    ckpt = torch.load(tmp_path / "work" / "latest.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


@pytest.mark.parametrize("name, kwargs", [("segformer-b0", {}), ("segformer-b0", {"decoder": "mmseg"}),
                                          ("dynasegformer-b0", {"sparsity": 0.3}), ("topformer-tiny", {})])
def test_gradients_arrive_in_their_parameters_layout(name, kwargs):
    # DDP's gradient buckets take each parameter's strides: a gradient arriving with other strides (depthwise and
    # 1×1 kernels on channels-last maps) is copied every step, with a warning
    from edgeseg import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=5, depths=[1, 1, 1, 1], **kwargs) if "segformer" in name \
        else create_model(name, num_classes=5)
    model.train()(torch.randn(2, 3, 64, 64)).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []


def test_pretrained_backbone_is_loaded_and_reported(tmp_path):
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.engine.train import build_model
    from edgeseg.models import create_model

    torch.manual_seed(1)
    imagenet = create_model("topformer-tiny-cls")
    save_checkpoint(tmp_path / "cls.pth", imagenet)
    messages = []
    model = build_model(tiny_cfg(f"model.pretrained={tmp_path / 'cls.pth'}"), 8, log=messages.append)
    own = model.state_dict()
    shared = [k for k in imagenet.state_dict() if k.startswith("token_pyramid.")]
    assert shared and all(torch.equal(own[k], imagenet.state_dict()[k]) for k in shared)
    assert "classifier skipped" in messages[0]
    with pytest.raises(FileNotFoundError, match="model.pretrained=null"):
        build_model(tiny_cfg("model.pretrained=missing.pth"), 8)


def test_pretrained_segmentation_model_of_another_dataset_gives_all_but_its_classifier(tmp_path):
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.engine.train import build_model
    from edgeseg.models import create_model

    torch.manual_seed(2)
    ade = create_model("topformer-tiny", num_classes=150)
    save_checkpoint(tmp_path / "ade.pth", ade)
    messages = []
    model = build_model(tiny_cfg(f"model.pretrained={tmp_path / 'ade.pth'}"), 8, log=messages.append)
    own, theirs = model.state_dict(), ade.state_dict()
    differ = [k for k in own if not torch.equal(own[k], theirs[k])]
    assert differ and all(own[k].shape[0] == 8 for k in differ)  # only the classifier is the model's own
    assert "classifier (150 classes) dropped" in messages[0]


def test_a_recipes_normalisation_test_resize_and_window_travel_to_prediction_and_export(tmp_path):
    from edgeseg.deploy.export import model_metadata
    from edgeseg.deploy.predict import Segmenter

    cfg = tiny_cfg("schedule.iters=1", "train.eval_interval=0", "data.mean=[100, 110, 120]", "data.std=[50, 60, 70]",
                   "data.size_divisor=16", "eval.mode=slide", "eval.crop_size=[64, 48]", "eval.stride=[32, 24]")
    train(cfg, tmp_path, progress=False, log=lambda *a: None)
    model = load_model(tmp_path / "latest.pth")
    assert model.input_mean == (100.0, 110.0, 120.0) and model.input_std == (50.0, 60.0, 70.0)
    assert model.test_scale == (128, 64) and model.test_size_divisor == 16  # tiny_cfg's data.test_scale
    transform = Segmenter(model).transform
    assert transform.mean == (100.0, 110.0, 120.0) and transform.std == (50.0, 60.0, 70.0)
    assert transform.scale == (128, 64) and transform.size_divisor == 16
    assert Segmenter(model, scale=(2048, 512)).transform.size_divisor is None  # a scale given: the caller's pipeline
    assert model.test_crop_size == (64, 48) and model.test_stride == (32, 24)  # the recipe's sliding window
    assert Segmenter(model).mode == "slide" and Segmenter(model).window == ((64, 48), (32, 24))
    assert Segmenter(model, mode="whole").window is None
    meta = model_metadata(model)
    assert json.loads(meta["input_std_rgb"]) == [50.0, 60.0, 70.0]
    assert json.loads(meta["test_scale"]) == [128, 64] and json.loads(meta["test_size_divisor"]) == 16
    assert json.loads(meta["test_crop_size"]) == [64, 48] and json.loads(meta["test_stride"]) == [32, 24]
    del model.input_mean, model.input_std  # a model without them (an official file): ImageNet's, ADE20K's resize
    del model.test_scale, model.test_size_divisor, model.test_crop_size, model.test_stride
    segmenter = Segmenter(model)
    transform = segmenter.transform
    assert transform.mean == (123.675, 116.28, 103.53) and transform.scale == (2048, 512)
    assert transform.size_divisor is None and segmenter.mode == "whole"
    assert not {"test_scale", "test_crop_size"} & set(model_metadata(model))
    with pytest.raises(ValueError, match="slide inference needs a window"):
        Segmenter(model, mode="slide")
    set_test_recipe(model, cfg)  # a recipe applied afresh (predict --config) sets all of it, a whole-image one
    assert model.test_crop_size == (64, 48) and model.input_std == (50.0, 60.0, 70.0)
    assert set_test_recipe(model, tiny_cfg()).test_crop_size is None  # clears the window


def test_a_checkpoint_older_than_its_test_pipeline_entries_takes_them_from_its_recipe(tmp_path):
    from edgeseg.checkpoint import TEST_PIPELINE_KEYS, atomic_save

    cfg = tiny_cfg("schedule.iters=1", "train.eval_interval=0", "data.std=[50, 60, 70]", "eval.mode=slide",
                   "eval.crop_size=[64, 48]", "eval.stride=[32, 24]")
    train(cfg, tmp_path, progress=False, log=lambda *a: None)
    ckpt = torch.load(tmp_path / "latest.pth", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k not in ("input_mean", "input_std") + TEST_PIPELINE_KEYS}
    atomic_save(old, tmp_path / "old.pth")  # as train wrote it before these entries travelled
    model = load_model(tmp_path / "old.pth")
    assert model.test_crop_size == (64, 48) and model.test_stride == (32, 24)
    assert model.input_std == (50.0, 60.0, 70.0) and model.test_scale == (128, 64)
    ckpt["test_crop_size"], ckpt["test_stride"] = [32, 32], [16, 16]  # what the file says wins over its recipe
    atomic_save(ckpt, tmp_path / "edited.pth")
    assert load_model(tmp_path / "edited.pth").test_crop_size == (32, 32)
    whole = {**old, "config": {**old["config"], "eval": {**old["config"]["eval"], "mode": "whole"}}}
    atomic_save(whole, tmp_path / "whole.pth")
    assert load_model(tmp_path / "whole.pth").test_crop_size is None
