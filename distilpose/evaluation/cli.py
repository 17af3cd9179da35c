"""`distilpose eval`: COCO keypoint AP of a checkpoint (default data: the embedded demo val split)."""
from __future__ import annotations

import argparse
import json
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="model preset (default: the one stored in the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (distilpose format)")
    parser.add_argument("--ann-file", default=None, help="COCO person_keypoints JSON (default: demo val split)")
    parser.add_argument("--img-prefix", default=None, help="image folder of --ann-file (default: demo val images)")
    parser.add_argument("--det-file", default=None, help="person detections (COCO results JSON); default: GT boxes")
    parser.add_argument("--det-score-thr", type=float, default=0.0, help="drop detections scored below (default 0)")
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", default=None, help="write the COCO results JSON here")
    parser.add_argument("--metrics-json", default=None, help="write the metrics dict here")
    parser.add_argument("--bad-sample", choices=("raise", "skip"), default="raise")


def run(args: argparse.Namespace) -> int:
    from ..data import TopDownCocoDataset
    from ..data.demo import default_demo_root, demo_paths, ensure_demo_dataset
    from ..inference import load_model, resolve_device
    from .predict import evaluate

    if (args.ann_file is None) != (args.img_prefix is None):
        raise SystemExit("distilpose eval: give both --ann-file and --img-prefix, or neither (embedded demo val split)")
    if args.ann_file is None:  # the embedded dataset as it is on disk (generated with defaults if absent)
        paths = demo_paths(default_demo_root())
        if not (os.path.isfile(paths["manifest"]) and os.path.isfile(paths["val_ann"])):
            paths = ensure_demo_dataset()
        args.ann_file, args.img_prefix = paths["val_ann"], paths["val_images"]
        print(f"evaluating on the embedded demo val split: {args.ann_file}")
    device = resolve_device(args.device)
    model = load_model(args.preset, args.checkpoint, device)
    ds = TopDownCocoDataset(args.ann_file, args.img_prefix, train=False, det_file=args.det_file,
                            det_score_thr=args.det_score_thr, bad_sample=args.bad_sample,
                            input_size=model.input_size, heatmap_size=model.heatmap_size)
    t0 = time.time()
    metrics = evaluate(model, ds, flip_test=not args.no_flip, batch_size=args.batch_size,
                       num_workers=args.num_workers, device=device, results_file=args.out, progress=True)
    dt = time.time() - t0
    print(f"{model.name} ({model.kind}) on {os.path.basename(args.ann_file)}: {len(ds)} boxes, {dt:.1f} s, "
          f"flip test {'off' if args.no_flip else 'on'}")
    for k, v in metrics.items():
        print(f"  {k:5s} {v:.4f}")
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(dict(metrics, preset=model.name, checkpoint=args.checkpoint, ann_file=args.ann_file), f, indent=2)
    return 0
