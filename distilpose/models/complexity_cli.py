"""`distilpose complexity`: params and GMACs of presets, against the paper's numbers."""
from __future__ import annotations

import argparse

from .complexity import HEADER, measure_complexity
from .presets import PRESETS, build_model

#: (params, GFLOPs) as published (spec table); GFLOPs there are multiply-adds of convs + linears.
PAPER = {"distilpose_s": (5.36e6, 2.38), "distilpose_l": (21.27e6, 10.33), "tokenpose_teacher": (69.4e6, 17.03)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("presets", nargs="*", default=list(PAPER), help=f"presets (default: the paper's); any of {sorted(PRESETS)}")


def run(args: argparse.Namespace) -> int:
    print(HEADER + f" {'paper':>8} {'diff':>7}")
    for name in args.presets:
        c = measure_complexity(build_model(name), name=name)
        ref = PAPER.get(name)
        extra = f" {ref[1]:>8.2f} {100 * (c.gmacs_paper / ref[1] - 1):>+6.1f}%" if ref else ""
        print(c.row() + extra)
    print("GMACs: conv + linear multiply-adds (the paper's convention); full: + attention products.")
    return 0
