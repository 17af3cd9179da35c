"""`distilpose make-data`: write the embedded procedural COCO-format person dataset."""
from __future__ import annotations

import argparse
import json
import time

from .demo import default_demo_root, generate_demo_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None, help=f"output folder (default: {default_demo_root()})")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=256, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=384, help="largest image side (px)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if an identical dataset exists")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    paths = generate_demo_dataset(
        args.root, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
        image_size=(args.min_size, args.max_size), num_workers=args.workers, overwrite=args.overwrite, progress=True,
    )
    counts = {}
    for split in ("train", "val"):
        with open(paths[f"{split}_ann"]) as f:
            d = json.load(f)
        counts[split] = (len(d["images"]), len(d["annotations"]))
    print(f"demo dataset at {paths['root']} ({time.time() - t0:.1f} s)")
    for split, (ni, na) in counts.items():
        print(f"  {split}: {ni} images, {na} people -> {paths[split + '_ann']}")
    return 0
