"""Hugging Face SegFormer folders (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) ↔ edgeseg.

Reading needs neither transformers nor (for ``.bin`` weights) safetensors: the config is plain JSON and the key
mapping is ``segformer.convert_state_dict``. Written folders load in ``transformers`` with
``SegformerForSemanticSegmentation.from_pretrained`` (or ``SegformerForImageClassification`` for ``mit-*``).

LayerNorm eps: transformers builds every SegFormer LayerNorm with eps 1e-5, the official code uses 1e-6 in the
block and stage norms. A model read from a folder is built with ``ln_eps=1e-5`` (recorded in ``model_args``) so it
reproduces transformers' outputs; a model with the official eps written to a folder computes, inside transformers,
logits that differ by the eps effect (≤ ~2e-5 on random weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write, read_weights, write_text
from .segformer import (HF_LN_EPS, SHARED, VARIANTS, MiTClassifier, MLPDecoder, MMSegMLPDecoder, SegFormer,
                        closest_variant, convert_state_dict)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno})") from err


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face folder: single file or sharded (``*.index.json``), safetensors or .bin."""
    folder = Path(folder)
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(path)
            if not isinstance(index.get("weight_map") if isinstance(index, dict) else None, dict):
                raise ValueError(f"'{path}' has no weight_map: save the folder again with save_pretrained")
            shards = sorted(set(index["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_weights(folder / shard))
            return sd
        return read_weights(path)
    raise FileNotFoundError(f"'{folder}' has config.json but no weights: expected one of {', '.join(_WEIGHT_FILES)}")


def _config_args(cfg: dict[str, Any], config_path: Path) -> tuple[str, dict[str, Any]]:
    """(variant, builder overrides) for an HF SegFormer config; one-line errors for configs we cannot build."""
    def get(key: str, default: Any) -> Any:
        value = cfg.get(key, default)
        return list(value) if isinstance(value, (list, tuple)) else value

    expected = {"num_encoder_blocks": 4, "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2], "hidden_act": "gelu"}
    for key, want in expected.items():
        if get(key, want) != want:
            raise ValueError(f"'{config_path}': {key}={get(key, want)} is not supported (SegFormer uses {want}); "
                             f"only the published MiT/SegFormer architecture can be loaded")
    dims = get("hidden_sizes", [32, 64, 160, 256])
    depths = get("depths", [2, 2, 2, 2])
    variant = closest_variant(dims, depths)
    base = {**SHARED, **VARIANTS[variant]}
    found = {"embed_dims": dims, "depths": depths, "num_heads": get("num_attention_heads", [1, 2, 5, 8]),
             "sr_ratios": get("sr_ratios", [8, 4, 2, 1]), "mlp_ratios": get("mlp_ratios", [4, 4, 4, 4]),
             "decoder_dim": get("decoder_hidden_size", 256)}
    args: dict[str, Any] = {}
    for key, value in found.items():
        default = list(base[key]) if isinstance(base[key], tuple) else base[key]
        if value != default:
            args[key] = value
    if get("num_channels", 3) != 3:
        args["in_channels"] = get("num_channels", 3)
    args["ln_eps"] = HF_LN_EPS
    return variant, args


def load_hf_folder(path: str | os.PathLike) -> nn.Module:
    """Build and load the edgeseg model for a Hugging Face SegFormer folder; returns it in eval mode.

    ``SegformerForSemanticSegmentation`` → ``segformer-bX``, ``SegformerForImageClassification`` / ``SegformerModel``
    → ``mit-bX``. Class names (``id2label``) are kept as ``model.class_names``.
    """
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a Hugging Face model folder (no config.json): check the path")
    cfg = _read_json(config_path)
    if not isinstance(cfg, dict) or cfg.get("model_type") != "segformer":
        found = repr(cfg.get("model_type")) if isinstance(cfg, dict) else f"missing (a JSON {type(cfg).__name__})"
        raise ValueError(f"'{config_path}': model_type is {found}, not 'segformer'; "
                         f"only SegFormer folders are supported")
    variant, args = _config_args(cfg, config_path)
    converted = convert_state_dict(read_hf_weights(folder))
    if converted is None:
        raise ValueError(f"'{folder}': the weights are not in a SegFormer layout")
    sd, _ = converted
    seg = "decode_head.linear_pred.weight" in sd
    id2label = cfg.get("id2label") or {}
    if not isinstance(id2label, dict) or not all(str(k).isdigit() for k in id2label):
        raise ValueError(f"'{config_path}': id2label must map class ids to names, e.g. {{\"0\": \"road\"}}")
    id2label = {int(k): v for k, v in id2label.items()}
    if seg:
        num_classes = sd["decode_head.linear_pred.weight"].shape[0]
    else:
        num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    from .segformer import MODELS  # late: the builders are the family's public entry points

    model = MODELS[f"{'segformer' if seg else 'mit'}-{variant}"](num_classes=num_classes, **args)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # a shape config.json states but the weights do not have
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise ValueError(f"'{folder}': weights do not match config.json ({mismatch})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"'{folder}': weights do not match config.json ({len(result.missing_keys)} missing, e.g. "
                         f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. "
                         f"{result.unexpected_keys[:2]})")
    names = [id2label.get(i) for i in range(num_classes)]
    if all(names) and names != [f"LABEL_{i}" for i in range(num_classes)]:  # transformers' placeholders say nothing
        model.class_names = names
    _read_extras(model, folder, cfg)
    return model.eval()


def _read_extras(model: nn.Module, folder: Path, cfg: dict[str, Any]) -> None:
    """What :func:`save_hf_folder` keeps beside the weights: the normalisation from ``preprocessor_config.json``
    (transformers' own place for it, 0–1 units there), the palette, test resize and sliding window from
    config.json's ``edgeseg`` entry. Missing or malformed entries are left out: the model then takes the defaults, as
    an official file does."""
    from ..checkpoint import (set_labels, set_normalization, set_test_resize,  # checkpoint imports this module
                              set_test_windows)

    processor = folder / "preprocessor_config.json"
    pre = _read_json(processor) if processor.is_file() else {}
    pre = pre if isinstance(pre, dict) else {}
    mean, std, factor = pre.get("image_mean"), pre.get("image_std"), pre.get("rescale_factor", 1 / 255)

    def three_numbers(v: Any) -> bool:
        return isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)

    if (pre.get("do_normalize", True) and pre.get("do_rescale", True) and three_numbers(mean) and three_numbers(std)
            and isinstance(factor, (int, float)) and factor > 0):
        # back to pixel units (transformers normalises pixels · rescale_factor), rounded to 1e-4 of a pixel value:
        # 0.485 · 255 is 123.67499999999998 in floats, 123.675 in every recipe
        set_normalization(model, [round(m / factor, 4) for m in mean], [round(s / factor, 4) for s in std])
    extras = cfg.get("edgeseg") if isinstance(cfg.get("edgeseg"), dict) else {}
    set_labels(model, None, extras.get("palette"))

    def two_sizes(v: Any) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)

    test_scale, divisor = extras.get("test_scale"), extras.get("test_size_divisor")
    if two_sizes(test_scale):
        set_test_resize(model, test_scale, divisor if isinstance(divisor, int) and divisor > 0 else None)
    crop, stride = extras.get("test_crop_size"), extras.get("test_stride")
    window = (crop, stride) if two_sizes(crop) and two_sizes(stride) and all(
        s <= c for s, c in zip(stride, crop)) else (None, None)  # a stride past its crop: malformed, left out
    set_test_windows(model, *window)

# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------

_TO_HF_ENCODER = (
    (".patch_embed.norm.", ".layer_norm."),
    (".patch_embed.", "."),
    (".attn.q.", ".attention.self.query."),
    (".attn.sr.", ".attention.self.sr."),
    (".attn.norm.", ".attention.self.layer_norm."),
    (".attn.proj.", ".attention.output.dense."),
    (".norm1.", ".layer_norm_1."),
    (".norm2.", ".layer_norm_2."),
    (".mlp.fc1.", ".mlp.dense1."),
    (".mlp.fc2.", ".mlp.dense2."),
    (".mlp.dwconv.", ".mlp.dwconv.dwconv."),
)
_TO_HF_HEAD = {
    "decode_head.linear_fuse.conv.": "decode_head.linear_fuse.",
    "decode_head.linear_fuse.bn.": "decode_head.batch_norm.",
    "decode_head.linear_pred.": "decode_head.classifier.",
    "head.": "classifier.",
}


def _hf_key(key: str, prefix: str) -> str:
    if key.startswith("decode_head.linear_c."):
        i, rest = key[len("decode_head.linear_c."):].split(".", 1)
        return f"decode_head.linear_c.{i}.proj.{rest}"
    for ours, theirs in _TO_HF_HEAD.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    stage, rest = key[len("encoder.stages."):].split(".", 1)
    if rest.startswith("patch_embed."):
        rest = f"patch_embeddings.{stage}." + rest
    elif rest.startswith("blocks."):
        rest = f"block.{stage}." + rest[len("blocks."):]
    elif rest.startswith("norm."):
        rest = f"layer_norm.{stage}." + rest[len("norm."):]
    rest = "." + rest
    for ours, theirs in _TO_HF_ENCODER:
        rest = rest.replace(ours, theirs)
    return f"{prefix}encoder{rest}"


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the Hugging Face checkpoint layout (``segformer.encoder.*``, split key/value)."""
    prefix = "" if isinstance(model, MiTClassifier) and model.num_classes == 0 else "segformer."
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if ".attn.kv." in key:
            k, v = value.chunk(2, dim=0)
            out[_hf_key(key.replace(".attn.kv.", ".attn.q."), prefix).replace(".query.", ".key.")] = k.clone()
            out[_hf_key(key.replace(".attn.kv.", ".attn.q."), prefix).replace(".query.", ".value.")] = v.clone()
        else:
            out[_hf_key(key, prefix)] = value
    return out


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild ``model`` (read off the modules, not the name)."""
    from ..checkpoint import TEST_PIPELINE_KEYS  # checkpoint imports this module

    if not isinstance(model, (SegFormer, MiTClassifier)):
        raise ValueError(f"{getattr(model, 'model_name', type(model).__name__)}: Hugging Face's SegFormer holds "
                         f"SegFormer and MiT models only; keep it in the edgeseg layout (edgeseg convert SRC DST "
                         f"--to edgeseg)")
    if isinstance(model, SegFormer) and isinstance(model.decode_head, MMSegMLPDecoder):
        raise ValueError(f"{getattr(model, 'model_name', 'this SegFormer')} has mmsegmentation's decode head "
                         f"(decoder='mmseg'), which Hugging Face's SegFormer cannot hold (it has only the official "
                         f"decoder): keep it in the edgeseg layout (edgeseg convert SRC DST --to edgeseg)")
    if isinstance(model, SegFormer) and not isinstance(model.decode_head, MLPDecoder):
        raise ValueError("save_hf_folder needs the trainable form: save the model before fuse()")
    stages = model.encoder.stages
    num_classes = model.num_classes
    names = list(getattr(model, "class_names", None) or [f"LABEL_{i}" for i in range(num_classes)])
    cfg: dict[str, Any] = {
        "architectures": ["SegformerForSemanticSegmentation" if isinstance(model, SegFormer) else
                          "SegformerForImageClassification" if num_classes else "SegformerModel"],
        "model_type": "segformer",
        "num_channels": stages[0].patch_embed.proj.in_channels,
        "num_encoder_blocks": len(stages),
        "depths": [len(s.blocks) for s in stages],
        "sr_ratios": [s.blocks[0].attn.sr_ratio for s in stages],
        "hidden_sizes": [s.patch_embed.proj.out_channels for s in stages],
        "patch_sizes": [s.patch_embed.proj.kernel_size[0] for s in stages],
        "strides": [s.patch_embed.proj.stride[0] for s in stages],
        "num_attention_heads": [s.blocks[0].attn.num_heads for s in stages],
        "mlp_ratios": [s.blocks[0].mlp.fc1.out_features // s.blocks[0].mlp.fc1.in_features for s in stages],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "drop_path_rate": 0.1,
        "layer_norm_eps": 1e-6,
        "decoder_hidden_size": model.decode_head.embed_dim if isinstance(model, SegFormer) else 256,
        "semantic_loss_ignore_index": 255,
        "reshape_last_stage": True,
    }
    if num_classes:
        cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
        cfg["label2id"] = {n: i for i, n in enumerate(names)}
    extras = {key: getattr(model, key) for key in ("palette",) + TEST_PIPELINE_KEYS if getattr(model, key, None)}
    if extras:  # what transformers has no field for; it keeps unknown config entries as they are (JSON: tuples → lists)
        cfg["edgeseg"] = extras
    return cfg


def hf_preprocessor_config(model: nn.Module) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``AutoImageProcessor``: the model's input normalisation (ImageNet's unless it
    was trained with another), in transformers' units (pixels / 255). Its fixed-size resize is transformers'
    default; edgeseg's keep-ratio test resize travels in config.json."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = getattr(model, "input_mean", IMAGENET_MEAN), getattr(model, "input_std", IMAGENET_STD)
    return {"image_processor_type": "SegformerImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [m / 255 for m in mean], "image_std": [s / 255 for s in std]}


def save_hf_folder(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (``pytorch_model.bin`` when safetensors is not installed)
    that ``transformers`` loads with ``from_pretrained``, and ``preprocessor_config.json`` for its
    ``AutoImageProcessor``; each file is written atomically. Class names, palette, normalisation and test resize
    come back with :func:`load_hf_folder`. Returns the folder."""
    folder = Path(path)
    cfg = hf_config(model)  # first: a model transformers cannot hold leaves no empty folder behind
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model)
    try:
        from safetensors.torch import save_file
    except ImportError:
        written, stale = "pytorch_model.bin", "model.safetensors"
        atomic_write(folder / written, lambda tmp: torch.save(sd, tmp))
    else:
        written, stale = "model.safetensors", "pytorch_model.bin"
        atomic_write(folder / written, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    (folder / stale).unlink(missing_ok=True)  # an older save in the other format would shadow this one
    write_text(folder / "config.json", json.dumps(cfg, indent=2) + "\n")
    write_text(folder / "preprocessor_config.json", json.dumps(hf_preprocessor_config(model), indent=2) + "\n")
    return folder
