"""`distilpose train-teacher`: train the heatmap teacher (TokenPose) with per-joint weighted MSE."""
from __future__ import annotations

import argparse

from .cli_common import add_common_arguments, config_from_args, resume_path, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, default_config="tokenpose_teacher_coco")
    p.add_argument("--preset", default=None, help="teacher model preset (e.g. tokenpose_teacher, tokenpose_tiny)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, {"model.preset": args.preset})
    if cfg.mode != "teacher":
        raise SystemExit(f"train-teacher: config {cfg.name!r} is a {cfg.mode!r} config; use `distilpose distill`")
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    return run_training(cfg, resume_path(args, cfg))
