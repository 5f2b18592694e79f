"""Config loading: typed YAML, dotted overrides, typo suggestions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeseg.config import Config, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_values_are_typed(tmp_path):
    # PyYAML reads 6e-5 as a string; the float field must turn it into a number.
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 6e-5\ndata:\n  crop_size: [480, 480]\n"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 6e-5
    assert cfg.data.crop_size == (480, 480)
    assert cfg.schedule.warmup_iters == 1500 and cfg.optim.head_lr_mult == 10.0  # defaults kept


def test_overrides_are_typed_by_field(tmp_path):
    cfg = load_config(_write(tmp_path, "model:\n  name: topformer-tiny\n"),
                      ["optim.lr=1e-4", "data.crop_size=256,256", "train.sync_bn=false", "model.num_classes=19",
                       "model.overrides.head_channels=128", "eval.stride=null", "schedule.iters=1_000"])
    assert cfg.optim.lr == 1e-4
    assert cfg.data.crop_size == (256, 256)
    assert cfg.train.sync_bn is False
    assert cfg.model.num_classes == 19
    assert cfg.model.overrides == {"head_channels": 128}
    assert cfg.eval.stride is None
    assert cfg.schedule.iters == 1000


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(_write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ValueError, match=r"'schedule.warmup_iter'.*did you mean 'schedule.warmup_iters'"):
        load_config(None, ["schedule.warmup_iter=10"])
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 0.1\n"))


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="optim.lr: expected float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="eval.mode must be 'whole' or 'slide'"):
        load_config(None, ["eval.mode=sliding"])
    with pytest.raises(ValueError, match="needs eval.crop_size and eval.stride"):
        load_config(None, ["eval.mode=slide"])
    with pytest.raises(ValueError, match="data.crop_size: expected 2 values"):
        load_config(None, ["data.crop_size=[1,2,3]"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Path("no/such.yaml"))
    with pytest.raises(ValueError, match="is a folder: pass a recipe YAML file"):
        load_config(tmp_path)
    (tmp_path / "mm.py").write_text("_base_ = ['../_base_/models/segformer.py']\n")
    with pytest.raises(ValueError, match=r"is a Python \(mmseg\) config: edgeseg reads YAML recipes"):
        load_config(tmp_path / "mm.py")
    for bad, message in [("data.test_scale=[0, 0]", r"data.test_scale must be positive"),
                         ("data.ratio_range=[2.0, 0.5]", r"data.ratio_range is \(low, high\)"),
                         ("data.std=[0, 1, 1]", "data.std divides the pixels"),
                         ("data.std=[58, -57, 57]", "data.std divides the pixels: each must be positive"),
                         ("optim.lr=-0.01", "optim.lr must be >= 0"),
                         ("data.workers=-1", "data.workers must be >= 0"),
                         ("data.flip_prob=5", r"data.flip_prob must be in \[0, 1\]"),
                         ("model.num_classes=-2", "model.num_classes must be positive")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [bad])
    with pytest.raises(ValueError, match=r"eval.stride \[100, 100\] must not exceed eval.crop_size \[32, 32\]"):
        load_config(None, ["eval.mode=slide", "eval.crop_size=[32, 32]", "eval.stride=[100, 100]"])
    with pytest.raises(ValueError, match=r"with --set: data.batch_size must be >= 1"):
        load_config(_write(tmp_path, "data:\n  batch_size: 2\n"), ["data.batch_size=-4"])
    with pytest.raises(ValueError, match="not valid YAML at line 2, column 8: mapping values are not allowed"):
        load_config(_write(tmp_path, "optim:\n  lr: 1: 2\n"))
    with pytest.raises(ValueError, match="unknown config key '_base_'"):
        load_config(_write(tmp_path, "_base_: other.yaml\n"))
    with pytest.raises(ValueError, match="'model.overrides.depth' is 3, not a mapping"):
        load_config(None, ["model.overrides.depth=3", "model.overrides.depth.x=1"])
    recipe = _write(tmp_path, "model:\n  name: topformer-tinny\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(recipe))}: model.name 'topformer-tinny' is unknown "
                                         r"\(did you mean topformer-tiny, "):
        load_config(recipe)
    with pytest.raises(ValueError, match=r"^config with --set: data.dataset 'foldr' is unknown \(did you mean folder"):
        load_config(None, ["data.dataset=foldr"])
    with pytest.raises(ValueError, match=r"^config with --set: data.dataset 'imagenet' is unknown; one of ade20k, "):
        load_config(None, ["data.dataset=imagenet"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match=r"empty.yaml' is empty: start from a configs/\*.yaml recipe"):
        load_config(empty)


def test_dump_roundtrip(tmp_path):
    (tmp_path / "recipe.yaml").write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.05\n")
    cfg = load_config(tmp_path / "recipe.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 0.05)
    cfg.dump(tmp_path / "dump.yaml")
    again = load_config(tmp_path / "dump.yaml")
    assert again == cfg and isinstance(again, Config)
