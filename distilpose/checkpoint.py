"""Checkpoints: atomic save/load of our models, and the authors' original (mmcv) release layout.

Our checkpoint: {"state_dict": ..., "meta": {"preset": name, ...}, ...extra}.
Original release: {"state_dict": {"backbone.*", "keypoint_head.tokenhead.*"}, "meta": ...}.
`distilpose convert` moves between the two.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

ORIGINAL_TOKENHEAD = "keypoint_head.tokenhead."

# (our suffix pattern, original suffix pattern) inside the TDE / head, applied after the prefixes.
_TDE_RULES: List[Tuple[str, str]] = [
    (r"tde\.keypoint_token", "keypoint_token"),
    (r"tde\.pos_embedding", "pos_embedding"),
    (r"tde\.patch_embed\.(weight|bias)", r"patch_to_embedding.\1"),
    (r"tde\.layers\.(\d+)\.norm1\.(weight|bias)", r"transformer.layers.\1.0.fn.norm.\2"),
    (r"tde\.layers\.(\d+)\.attn\.qkv\.weight", r"transformer.layers.\1.0.fn.fn.to_qkv.weight"),
    (r"tde\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer.layers.\1.0.fn.fn.to_out.0.\2"),
    (r"tde\.layers\.(\d+)\.norm2\.(weight|bias)", r"transformer.layers.\1.1.fn.norm.\2"),
    (r"tde\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.layers.\1.1.fn.fn.net.0.\2"),
    (r"tde\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.layers.\1.1.fn.fn.net.3.\2"),
]
_HEAD_RULES = {
    "student": [(r"head\.norm\.(weight|bias)", r"mlp_head.0.\1"), (r"head\.fc\.(weight|bias)", r"mlp_head.1.\1")],
    "teacher": [
        (r"head\.norm1\.(weight|bias)", r"mlp_head.0.\1"),
        (r"head\.fc1\.(weight|bias)", r"mlp_head.1.\1"),
        (r"head\.norm2\.(weight|bias)", r"mlp_head.2.\1"),
        (r"head\.fc2\.(weight|bias)", r"mlp_head.3.\1"),
    ],
}


class CheckpointMismatchError(RuntimeError):
    """Raised when a checkpoint does not fit the model and a partial load was not asked for."""


def _pattern_to_template(pattern: str) -> str:
    """Turn a regex like r'a\\.(\\d+)\\.b' into a format template 'a.\\1.b' for the reverse direction."""
    out, group = [], 0
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern) and pattern[i + 1] == ".":
            out.append(".")
            i += 2
        elif pattern[i] == "(":
            group += 1
            out.append(f"\\{group}")
            i = pattern.index(")", i) + 1
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def _rules(kind: str) -> List[Tuple[str, str]]:
    if kind not in _HEAD_RULES:
        raise ValueError(f"kind: expected 'student' or 'teacher', got {kind!r}")
    return _TDE_RULES + _HEAD_RULES[kind]


def to_original_state_dict(state_dict: Mapping[str, torch.Tensor], kind: str) -> Dict[str, torch.Tensor]:
    """Our keys -> the original release's keys (backbone.* unchanged, TDE/head under keypoint_head.tokenhead.)."""
    out: Dict[str, torch.Tensor] = {}
    rules = _rules(kind)
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out[key] = value
            continue
        for ours, orig in rules:
            m = re.fullmatch(ours, key)
            if m:
                out[ORIGINAL_TOKENHEAD + m.expand(orig)] = value
                break
        else:
            raise KeyError(f"state_dict: no original-layout name for key {key!r}")
    return out


def from_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], kind: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Original keys -> ours. Returns (converted, keys that have no counterpart)."""
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    rules = [(re.escape(ORIGINAL_TOKENHEAD) + _template_regex(orig), _pattern_to_template(ours)) for ours, orig in _rules(kind)]
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out[key] = value
            continue
        for pattern, template in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(template)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def _template_regex(template: str) -> str:
    """'transformer.layers.\\1.0.fn.norm.\\2' -> a regex with capture groups in the same order."""
    parts = re.split(r"(\\\d)", template)
    regex = []
    for p in parts:
        if re.fullmatch(r"\\\d", p):
            regex.append(r"(\d+|weight|bias)")
        else:
            regex.append(re.escape(p))
    return "".join(regex)


# ----------------------------------------------------------------------------- file I/O


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": ckpt, "meta": {}}
    raise ValueError(f"checkpoint {path!r}: expected a dict with 'state_dict' (or a bare state dict)")


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
