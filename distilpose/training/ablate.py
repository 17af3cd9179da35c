"""`distilpose ablate`: the same student trained with each distillation part switched off.

Variants (same seed, data order and schedule; only the loss terms differ):
  full        all five terms (keypoint regression, token distillation, Reg2HM, score)
  no_token    without visual/keypoint token distillation
  no_reg2hm   without the simulated-heatmap (Reg2HM) loss
  no_score    without the score loss
  none        no teacher at all: plain keypoint regression
Prints an AP table in the shape of the paper's ablation (check marks per part). On the embedded
data a teacher is trained first (or pass --teacher-checkpoint). Each variant's folder is
resumable; finished variants are not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..checkpoint import read_checkpoint
from ..fileio import atomic_write
from .config import TrainConfig, apply_overrides, get_preset, parse_override

VARIANTS = {
    "full": dict(disable=[], teacher=True),
    "no_token": dict(disable=["token"], teacher=True),
    "no_reg2hm": dict(disable=["reg2hm"], teacher=True),
    "no_score": dict(disable=["score"], teacher=True),
    "none": dict(disable=["token", "reg2hm", "score"], teacher=False),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo_student", help="the student config preset (default demo_student; distilpose_s_coco)")
    p.add_argument("--teacher-config", default="demo_teacher", help="config to train the teacher with when no checkpoint is given")
    p.add_argument("--teacher-checkpoint", "-t", default=None, help="a trained teacher (skips teacher training)")
    p.add_argument("--out", default="runs/ablate", help="output folder (one sub-folder per variant)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    p.add_argument("--data-root", default=None, help="COCO root (paper configs) or the demo root")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (every variant)")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="student config override")
    p.add_argument("--set-teacher", action="append", default=[], metavar="KEY=VALUE", help="teacher config override")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _done(work_dir: str, epochs: int) -> bool:
    last = os.path.join(work_dir, "last.pth")
    if not os.path.isfile(last):
        return False
    tr = read_checkpoint(last).get("trainer", {})
    return tr.get("epoch", 0) >= epochs or tr.get("stop_reason") == "max_time_s"


def _train(cfg: TrainConfig, label: str) -> Dict[str, Any]:
    from .trainer import Trainer

    last = os.path.join(cfg.work_dir, "last.pth")
    trainer = Trainer(cfg)
    try:
        print(f"[{label}] {cfg.model.preset}: {cfg.optim.epochs} epochs x {trainer.iters_per_epoch} steps", flush=True)
        return trainer.fit(resume=last if os.path.isfile(last) else None)
    finally:
        trainer.close()


def format_ablation(rows: List[Dict[str, Any]]) -> str:
    head = f"| {'variant':<10} | {'token distil.':^13} | {'sim. heatmaps':^13} | {'score':^5} | {'AP':>6} | {'AP50':>6} | {'AP75':>6} | {'AR':>6} |"
    sep = "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        on = lambda part: "x" if r["teacher"] and part not in r["disable"] else ""  # noqa: E731
        m = r["metrics"]
        lines.append(
            f"| {r['variant']:<10} | {on('token'):^13} | {on('reg2hm'):^13} | {on('score'):^5} | "
            f"{m.get('AP', float('nan')) * 100:>6.1f} | {m.get('AP50', float('nan')) * 100:>6.1f} | "
            f"{m.get('AP75', float('nan')) * 100:>6.1f} | {m.get('AR', float('nan')) * 100:>6.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    common: Dict[str, Any] = {"progress": not args.no_progress}
    if args.data_root:
        common["data.root"] = args.data_root
    teacher_ckpt: Optional[str] = args.teacher_checkpoint
    if teacher_ckpt is None and any(VARIANTS[v]["teacher"] for v in names):
        t_over = dict(common, work_dir=os.path.join(args.out, "teacher"))
        if args.teacher_epochs is not None:
            t_over["optim.epochs"] = args.teacher_epochs
        t_over.update(dict(parse_override(o) for o in args.set_teacher))
        t_cfg = apply_overrides(get_preset(args.teacher_config), t_over)
        if not _done(t_cfg.work_dir, t_cfg.optim.epochs):
            _train(t_cfg, "teacher")
        teacher_ckpt = os.path.join(t_cfg.work_dir, "last.pth")
    rows = []
    for v in names:
        spec = VARIANTS[v]
        over = dict(common, work_dir=os.path.join(args.out, v), final_eval=True)
        over["loss.disable"] = spec["disable"] if spec["teacher"] else []
        if spec["teacher"]:
            over["teacher.checkpoint"] = teacher_ckpt
        else:
            over["teacher.preset"] = None
            over["teacher.checkpoint"] = None
        if args.epochs is not None:
            over["optim.epochs"] = args.epochs
        over.update(dict(parse_override(o) for o in args.overrides))
        cfg = apply_overrides(get_preset(args.config), over)
        result_path = os.path.join(cfg.work_dir, "result.json")
        if os.path.isfile(result_path) and _done(cfg.work_dir, cfg.optim.epochs):
            with open(result_path) as f:
                metrics = json.load(f)["metrics"]
        else:
            summary = _train(cfg, v)
            metrics = summary["last_eval"]
            atomic_write(result_path, json.dumps({"variant": v, "metrics": metrics, "summary": {
                k: s for k, s in summary.items() if k in ("epoch", "global_step", "train_s", "stop_reason")}}, indent=2))
        rows.append(dict(variant=v, disable=spec["disable"], teacher=spec["teacher"], metrics=metrics))
        print(f"[{v}] AP {metrics.get('AP', float('nan')) * 100:.1f}", flush=True)
    table = format_ablation(rows)
    print()
    print(table)
    atomic_write(os.path.join(args.out, "ablation.md"), table + "\n")
    atomic_write(os.path.join(args.out, "ablation.json"), json.dumps(rows, indent=2))
    return 0
