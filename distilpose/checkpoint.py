"""Checkpoints: atomic save/load of our models, and the authors' original (mmcv) release layout.

Our checkpoint: {"state_dict": ..., "meta": {"preset": name, ...}, ...extra}.
Original release: {"state_dict": {"backbone.*", "keypoint_head.tokenhead.*"}, "meta": ...}.
`distilpose convert` moves between the two.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .fileio import replace_into, staging_dir

ORIGINAL_TOKENHEAD = "keypoint_head.tokenhead."

# (our key, original key inside the token head) templates; {i} = layer index, {p} = weight/bias.
_TDE_RULES: List[Tuple[str, str]] = [
    ("tde.keypoint_token", "keypoint_token"),
    ("tde.pos_embedding", "pos_embedding"),
    ("tde.patch_embed.{p}", "patch_to_embedding.{p}"),
    ("tde.layers.{i}.norm1.{p}", "transformer.layers.{i}.0.fn.norm.{p}"),
    ("tde.layers.{i}.attn.qkv.{p}", "transformer.layers.{i}.0.fn.fn.to_qkv.{p}"),
    ("tde.layers.{i}.attn.proj.{p}", "transformer.layers.{i}.0.fn.fn.to_out.0.{p}"),
    ("tde.layers.{i}.norm2.{p}", "transformer.layers.{i}.1.fn.norm.{p}"),
    ("tde.layers.{i}.mlp.fc1.{p}", "transformer.layers.{i}.1.fn.fn.net.0.{p}"),
    ("tde.layers.{i}.mlp.fc2.{p}", "transformer.layers.{i}.1.fn.fn.net.3.{p}"),
]
_HEAD_RULES = {
    "student": [("head.norm.{p}", "mlp_head.0.{p}"), ("head.fc.{p}", "mlp_head.1.{p}")],
    "teacher": [
        ("head.norm1.{p}", "mlp_head.0.{p}"),
        ("head.fc1.{p}", "mlp_head.1.{p}"),
        ("head.norm2.{p}", "mlp_head.2.{p}"),
        ("head.fc2.{p}", "mlp_head.3.{p}"),
    ],
}
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


class CheckpointMismatchError(RuntimeError):
    """Raised when a checkpoint does not fit the model and a partial load was not asked for."""


def _rules(kind: str, to_original: bool) -> List[Tuple["re.Pattern[str]", str]]:
    """(regex of the source key, format template of the destination key) for one direction."""
    if kind not in _HEAD_RULES:
        raise ValueError(f"kind: expected 'student' or 'teacher', got {kind!r}")
    out = []
    for ours, orig in _TDE_RULES + _HEAD_RULES[kind]:
        orig = ORIGINAL_TOKENHEAD + orig
        src, dst = (ours, orig) if to_original else (orig, ours)
        pattern = re.escape(src)
        for name, group in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), group)
        out.append((re.compile(pattern), dst))
    return out


def _convert(state_dict: Mapping[str, torch.Tensor], kind: str, to_original: bool):
    """Rename keys one way; backbone.* keys are the same in both layouts. -> (converted, unmatched keys)."""
    rules = _rules(kind, to_original)
    out: Dict[str, torch.Tensor] = {}
    unmatched: List[str] = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out[key] = value
            continue
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                out[template.format(**m.groupdict())] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def to_original_state_dict(state_dict: Mapping[str, torch.Tensor], kind: str) -> Dict[str, torch.Tensor]:
    """Our keys -> the original release's keys (backbone.* unchanged, TDE/head under keypoint_head.tokenhead.)."""
    out, unmatched = _convert(state_dict, kind, to_original=True)
    if unmatched:
        raise KeyError(f"state_dict: no original-layout name for keys {unmatched[:8]}")
    return out


def from_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], kind: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Original keys -> ours. Returns (converted, keys that have no counterpart)."""
    return _convert(state_dict, kind, to_original=False)


# ----------------------------------------------------------------------------- file I/O


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=staging_dir(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        replace_into(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` as a dict with "state_dict" (and "meta" when stored).

    Loaded with ``weights_only=True`` (tensors, containers and numbers only: what this package
    writes). A file that needs full unpickling (a foreign pickle, or a training ``last.pth`` of
    a version before this one, which held numpy RNG arrays) is loaded in full with a warning:
    unpickling runs code from the file, so only do that for files you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        warnings.warn(f"checkpoint {path!r} holds objects beyond tensors and numbers ({str(e).splitlines()[-1][:200]}); "
                      "loading it with full unpickling, which runs code from the file: only for files you trust",
                      stacklevel=2)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": ckpt, "meta": {}}
    raise ValueError(f"checkpoint {path!r}: expected a dict with 'state_dict' (or a bare state dict)")


_read = read_checkpoint


def build_model_from_meta(meta: Mapping[str, Any], attention_backend: Optional[str] = None) -> nn.Module:
    """Rebuild the architecture a checkpoint's ``meta`` describes (preset, input size, number of
    keypoints, model overrides), as the trainer records it."""
    from .models import build_model

    if not meta.get("preset"):
        raise ValueError("checkpoint meta: no 'preset'; cannot rebuild the model")
    kw = dict(meta.get("model_overrides") or {})
    if meta.get("input_size"):
        kw["input_size"] = tuple(int(v) for v in meta["input_size"])
    return build_model(meta["preset"], num_keypoints=int(meta.get("num_keypoints", 17)),
                       attention_backend=attention_backend, **kw)


def model_from_checkpoint(path: str, device: Any = "cpu", attention_backend: Optional[str] = None) -> nn.Module:
    """Build the model a checkpoint describes and load its weights (strict); eval mode."""
    ckpt = read_checkpoint(path)
    if not ckpt.get("meta"):
        raise ValueError(f"checkpoint {path!r}: no 'meta' (preset) to rebuild the model from")
    model = build_model_from_meta(ckpt["meta"], attention_backend)
    load_checkpoint(path, model, strict=True)
    return model.to(device).eval()


def _load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, source: str, extra_unexpected=()) -> Dict[str, List[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own] + list(extra_unexpected)
    bad_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    report = {"missing": missing, "unexpected": unexpected, "shape_mismatch": bad_shape}
    if strict and (missing or unexpected or bad_shape):
        lines = [f"checkpoint {source!r} does not fit model {getattr(model, 'name', type(model).__name__)!r}:"]
        for name, keys in report.items():
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {name}: {shown}")
        lines.append("  (pass strict=False / --allow-partial to load the matching part anyway)")
        raise CheckpointMismatchError("\n".join(lines))
    loadable = {k: v for k, v in state_dict.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(loadable, strict=False)
    return report


def save_checkpoint(path: str, model: nn.Module, **extra: Any) -> None:
    """Save {"state_dict", "meta": {"preset", "kind"}, **extra} atomically."""
    meta = dict(extra.pop("meta", {}) or {})
    meta.setdefault("preset", getattr(model, "name", None))
    meta.setdefault("kind", getattr(model, "kind", None))
    atomic_save({"state_dict": model.state_dict(), "meta": meta, **extra}, path)


def load_checkpoint(path: str, model: nn.Module, strict: bool = True) -> Dict[str, Any]:
    """Load one of our checkpoints (or an original-release file, detected by its keys) into ``model``.

    Returns the checkpoint dict with a "load_report" (missing / unexpected / shape_mismatch keys).
    """
    ckpt = _read(path)
    sd = ckpt["state_dict"]
    if any(k.startswith(ORIGINAL_TOKENHEAD) for k in sd):
        return load_original_checkpoint(path, model, strict=strict)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    ckpt["load_report"] = _load_into(model, sd, strict, path)
    return ckpt


def load_original_checkpoint(path: str, model: nn.Module, strict: bool = True) -> Dict[str, Any]:
    """Load an authors'-release (mmcv) checkpoint into one of our presets, reporting every key that does not fit."""
    ckpt = _read(path)
    converted, unknown = from_original_state_dict(ckpt["state_dict"], model.kind)
    ckpt["load_report"] = _load_into(model, converted, strict, path, extra_unexpected=unknown)
    return ckpt


def save_original_checkpoint(path: str, model: nn.Module, meta: Optional[Dict[str, Any]] = None) -> None:
    """Save ``model`` in the original release's key layout (mmcv-style dict), atomically."""
    atomic_save({"state_dict": to_original_state_dict(model.state_dict(), model.kind), "meta": dict(meta or {})}, path)


# ----------------------------------------------------------------------------- CLI: distilpose convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read (ours or the original release's)")
    p.add_argument("dst", help="checkpoint to write")
    p.add_argument("--preset", required=True, help="model preset the weights belong to, e.g. distilpose_s")
    p.add_argument("--to", choices=("ours", "original"), default="ours", help="layout to write")
    p.add_argument("--allow-partial", action="store_true", help="load even if keys are missing or unexpected")


def run(args: argparse.Namespace) -> int:
    from .models import build_model

    model = build_model(args.preset)
    ckpt = load_checkpoint(args.src, model, strict=not args.allow_partial)
    for name, keys in ckpt["load_report"].items():
        if keys:
            print(f"{name} ({len(keys)}): {', '.join(keys[:20])}")
    if args.to == "original":
        save_original_checkpoint(args.dst, model, meta=ckpt.get("meta"))
    else:
        save_checkpoint(args.dst, model)
    print(f"wrote {args.dst} ({args.to} layout, preset {args.preset})")
    return 0
