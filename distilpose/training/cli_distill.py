"""`distilpose distill`: distil a regression student (DistilPose) from a frozen heatmap teacher."""
from __future__ import annotations

import argparse

from .cli_common import add_common_arguments, config_from_args, resume_path, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, default_config="distilpose_s_coco")
    p.add_argument("--preset", default=None, help="student model preset (distilpose_s, distilpose_l, distilpose_tiny, ...)")
    p.add_argument("--teacher-checkpoint", "-t", default=None, help="the trained teacher (from train-teacher)")
    p.add_argument("--teacher-preset", default=None, help="the teacher's model preset (default: the config's)")
    p.add_argument("--disable", default=None,
                   help="comma list of distillation parts to switch off: token,reg2hm,score (ablations)")
    p.add_argument("--no-teacher", action="store_true", help="plain regression baseline (no distillation)")
    p.add_argument("--reg2hm-mode", choices=["released", "per_sample"], default=None,
                   help="Reg2HM loss form: as released (default) or the per-sample weighted form")


def run(args: argparse.Namespace) -> int:
    extra = {
        "model.preset": args.preset,
        "teacher.checkpoint": args.teacher_checkpoint,
        "teacher.preset": args.teacher_preset,
        "loss.reg2hm_mode": args.reg2hm_mode,
    }
    if args.disable is not None:
        extra["loss.disable"] = [s.strip() for s in args.disable.split(",") if s.strip()]
    cfg = config_from_args(args, extra)
    if args.no_teacher:
        from .config import apply_overrides

        cfg = apply_overrides(cfg, {"teacher.preset": None, "teacher.checkpoint": None})
    if cfg.mode != "distill":
        raise SystemExit(f"distill: config {cfg.name!r} is a {cfg.mode!r} config; use `distilpose train-teacher`")
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    return run_training(cfg, resume_path(args, cfg))
