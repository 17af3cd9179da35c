"""`distilpose` command line. Each subcommand lives in its own module, imported only when run.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
