"""Arguments shared by `distilpose train-teacher`, `distilpose distill` and `distilpose ablate`."""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

from .config import PRESETS, TrainConfig, resolve_config


def add_common_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument(
        "--config", "-c", default=default_config,
        help=f"a config preset ({', '.join(sorted(PRESETS))}) or a YAML/JSON/Python config file (default {default_config})",
    )
    p.add_argument("--config-file", default=None, help="a YAML/JSON/Python file merged over the --config preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=5e-4 --set data.batch_size=16 (repeatable)")
    p.add_argument("--work-dir", default=None, help="output folder (checkpoints, metrics.jsonl, config.yaml)")
    p.add_argument("--data-root", default=None, help="COCO root (train2017/, val2017/, annotations/) or the demo root")
    p.add_argument("--det-file", default=None, help="person detections (COCO results JSON) for evaluation")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per process")
    p.add_argument("--amp", choices=["none", "auto", "bf16", "fp16"], default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="max global gradient norm")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a resumable checkpoint) after this many steps")
    p.add_argument("--eval-interval", type=int, default=None, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run: a last.pth, or no value for WORK_DIR/last.pth")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to WORK_DIR/tb (needs tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace, extra: Optional[Dict[str, object]] = None) -> TrainConfig:
    """preset/file <- --config-file <- shortcut flags <- --set (the last word wins)."""
    sets: List[str] = []
    short = {
        "work_dir": "work_dir", "data_root": "data.root", "det_file": "data.det_file", "epochs": "optim.epochs",
        "batch_size": "data.batch_size", "lr": "optim.lr", "workers": "data.num_workers", "amp": "amp",
        "device": "device", "channels_last": "channels_last", "grad_clip": "optim.grad_clip",
        "max_steps": "max_steps", "eval_interval": "eval_interval", "seed": "seed", "tensorboard": "tensorboard",
    }
    for attr, key in short.items():
        v = getattr(args, attr, None)
        if v is not None:
            sets.append(f"{key}={json.dumps(v)}")
    for key, v in (extra or {}).items():
        if v is not None:
            sets.append(f"{key}={json.dumps(v)}")
    if getattr(args, "no_progress", False):
        sets.append("progress=false")
    cfg = resolve_config(args.config, args.config_file, sets + list(args.overrides))
    return cfg


def resume_path(args: argparse.Namespace, cfg: TrainConfig) -> Optional[str]:
    if args.resume is None:
        return None
    path = os.path.join(cfg.work_dir, "last.pth") if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    return path


def run_training(cfg: TrainConfig, resume: Optional[str]) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.fit(resume=resume)
    finally:
        trainer.close()
    if trainer.info.is_main:
        state = "finished" if summary["finished"] else f"stopped at step {summary['global_step']} (resume with --resume)"
        print(f"{cfg.name}: {state}; epoch {summary['epoch']}, {summary['train_s']:.1f} s")
        if summary["last_eval"]:
            print("  " + "  ".join(f"{k} {v:.4f}" for k, v in summary["last_eval"].items()))
        print(f"  last: {summary['last_path']}" + (f"\n  best: {summary['best_path']}" if summary["best_path"] else ""))
    return 0
