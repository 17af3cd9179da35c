"""`distilpose` command line. Each subcommand lives in its own module, imported only when run.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("distilpose.demo", "the main job: embedded data -> teacher -> distilled student -> COCO eval (CPU, minutes)"),
    "smoke": ("distilpose.smoke", "build a preset, print its size table, run forward/backward on random crops"),
    "complexity": ("distilpose.models.complexity_cli", "params and GMACs of the presets (paper convention and full)"),
    "make-data": ("distilpose.data.cli", "write the embedded procedural COCO-format person dataset"),
    "train-teacher": ("distilpose.training.cli_teacher", "train the heatmap teacher (TokenPose)"),
    "distill": ("distilpose.training.cli_distill", "distil a regression student from a frozen teacher"),
    "ablate": ("distilpose.training.ablate", "train the student with each distillation part switched off"),
    "eval": ("distilpose.evaluation.cli", "COCO keypoint AP of a checkpoint"),
    "infer": ("distilpose.inference", "keypoints for images or a folder: JSON + overlay PNGs"),
    "export": ("distilpose.export", "export a student to ONNX (and check it with onnxruntime)"),
    "convert": ("distilpose.checkpoint", "convert between the original release's checkpoints and ours"),
}


# flag dest -> (lowest allowed value, whether the bound is exclusive); checked after parsing
_MIN = {
    "batch": (1, False), "batch_size": (1, False), "epochs": (1, False), "teacher_epochs": (1, False),
    "student_epochs": (1, False), "threads": (1, False), "opset": (1, False), "max_steps": (1, False),
    "num_train": (0, False), "num_val": (0, False), "workers": (0, False), "num_workers": (0, False),
    "eval_interval": (0, False), "num_overlays": (0, False),
    "lr": (0, True), "time_budget": (0, True), "grad_clip": (0, True),
}
#: flags naming an input file that must exist
_FILES = ("checkpoint", "teacher_checkpoint", "config_file", "ann_file", "det_file", "boxes", "resume")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range and existence checks shared by the subcommands: a one-line argparse error (exit 2)."""
    for dest, (low, strict) in _MIN.items():
        v = getattr(args, dest, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v <= low if strict else v < low):
            flag = "--" + dest.replace("_", "-")
            parser.error(f"argument {flag}: must be {'>' if strict else '>='} {low}, got {v}")
    for dest in _FILES:
        v = getattr(args, dest, None)
        if isinstance(v, str) and not (dest == "resume" and v == "auto") and not os.path.exists(v):
            parser.error(f"argument --{dest.replace('_', '-')}: no such file: {v!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilpose", description="DistilPose with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"distilpose {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    _check_args(sub, args)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
