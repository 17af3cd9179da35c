"""`distilpose demo`: the main job.

Embedded data -> a small heatmap teacher -> a DistilPose student distilled from it -> COCO
keypoint AP of both (pycocotools COCOeval) -> a table (AP, AP50, params, GMACs, images/s),
overlay pictures and loss curves, all in one output folder. On 2 CPU cores it finishes in a
few minutes with no download. With a preset and a COCO root it is the paper's run:

    distilpose demo --preset distilpose_s --teacher-preset tokenpose_teacher --data-root /data/coco

Every file is written atomically. A finished output folder is never overwritten: a rerun goes
to a new time-stamped folder unless ``--force``; an unfinished one (killed run) is resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .fileio import atomic_write, replace_into, staging_dir
from .training.config import TrainConfig, apply_overrides, get_preset, parse_override

PAPER_CONFIG = {"distilpose_s": "distilpose_s_coco", "distilpose_l": "distilpose_l_coco"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--force", action="store_true", help="restart in --out even if a finished run is there")
    p.add_argument("--tiny", action="store_true", help="a tiny run (CI smoke test, well under a minute)")
    p.add_argument("--preset", default=None, help="student model preset (default distilpose_tiny; distilpose_s for the paper)")
    p.add_argument("--teacher-preset", default=None, help="teacher model preset (default tokenpose_tiny; tokenpose_teacher)")
    p.add_argument("--teacher-checkpoint", default=None, help="use this trained teacher instead of training one")
    p.add_argument("--data-root", default=None, help="a COCO root: the paper's run (default: the embedded demo data)")
    p.add_argument("--det-file", default=None, help="person detections for COCO val (default: ground-truth boxes)")
    p.add_argument("--num-train", type=int, default=None, help="embedded data: training images")
    p.add_argument("--num-val", type=int, default=None, help="embedded data: validation images")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="data-loader workers")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--amp", choices=["none", "auto", "bf16", "fp16"], default=None)
    p.add_argument("--set-teacher", action="append", default=[], metavar="KEY=VALUE", help="override a teacher config field")
    p.add_argument("--set-student", action="append", default=[], metavar="KEY=VALUE", help="override a student config field")
    p.add_argument("--num-overlays", type=int, default=6, help="overlay pictures to write")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole embedded-data demo (default 285; 0: no limit); the two training "
                        "stages share what data generation leaves, keeping 25 s for evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- configs


def build_configs(args: argparse.Namespace, out: str) -> Tuple[TrainConfig, TrainConfig]:
    if args.data_root:  # the paper's run on COCO
        student_preset = args.preset or "distilpose_s"
        s_cfg = get_preset(PAPER_CONFIG.get(student_preset, "distilpose_s_coco"))
        t_cfg = get_preset("tokenpose_teacher_coco")
        common: Dict[str, Any] = {"data.root": args.data_root, "data.det_file": args.det_file}
        t_over = dict(common, **{"model.preset": args.teacher_preset or "tokenpose_teacher"})
        s_over = dict(common, **{"model.preset": student_preset, "teacher.preset": args.teacher_preset or "tokenpose_teacher"})
    else:
        t_cfg = get_preset("tiny_teacher" if args.tiny else "demo_teacher")
        s_cfg = get_preset("tiny_student" if args.tiny else "demo_student")
        common = {}
        for flag, key in (("num_train", "data.demo_num_train"), ("num_val", "data.demo_num_val")):
            if getattr(args, flag) is not None:
                common[key] = getattr(args, flag)
        t_over = dict(common)
        s_over = dict(common)
        if args.teacher_preset:
            t_over["model.preset"] = args.teacher_preset
            s_over["teacher.preset"] = args.teacher_preset
        if args.preset:
            s_over["model.preset"] = args.preset
    for over in (t_over, s_over):
        for flag, key in (("batch_size", "data.batch_size"), ("workers", "data.num_workers"), ("device", "device"), ("amp", "amp")):
            if getattr(args, flag) is not None:
                over[key] = getattr(args, flag)
        over["final_eval"] = False  # the demo evaluates both models itself (same protocol)
        over["eval_interval"] = 0
        if args.no_progress:
            over["progress"] = False
    if args.teacher_epochs is not None:
        t_over["optim.epochs"] = args.teacher_epochs
    if args.student_epochs is not None:
        s_over["optim.epochs"] = args.student_epochs
    t_over["work_dir"] = os.path.join(out, "teacher")
    s_over["work_dir"] = os.path.join(out, "student")
    t_over.update(dict(parse_override(o) for o in args.set_teacher))
    s_over.update(dict(parse_override(o) for o in args.set_student))
    return apply_overrides(t_cfg, t_over), apply_overrides(s_cfg, s_over)


def choose_out_dir(out: str, force: bool) -> Tuple[str, str]:
    """(folder, note). A finished run in ``out`` is kept: a new time-stamped folder is used instead."""
    if os.path.isfile(os.path.join(out, "summary.json")):
        if force:
            for sub in ("teacher", "student", "overlays"):
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            os.remove(os.path.join(out, "summary.json"))
            return out, f"--force: restarting in {out}"
        new = f"{out.rstrip(os.sep)}-{time.strftime('%Y%m%d-%H%M%S')}"
        return new, f"{out} holds a finished run; writing to {new} (use --force to overwrite)"
    if os.path.isdir(out) and any(os.path.exists(os.path.join(out, s, "last.pth")) for s in ("teacher", "student")):
        if force:
            for sub in ("teacher", "student", "overlays"):
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            return out, f"--force: restarting in {out}"
        return out, f"resuming the unfinished run in {out}"
    return out, ""


# ----------------------------------------------------------------------------- stages


def _finished(cfg: TrainConfig) -> Tuple[bool, Optional[str]]:
    """(finished, resume path) for a work dir."""
    last = os.path.join(cfg.work_dir, "last.pth")
    if not os.path.isfile(last):
        return False, None
    ck = read_checkpoint(last)
    tr = ck.get("trainer", {})
    # a stage stopped by its time budget counts as done: the demo moves on with what it has
    return tr.get("epoch", 0) >= cfg.optim.epochs or tr.get("stop_reason") == "max_time_s", last


def train_stage(cfg: TrainConfig, label: str) -> Dict[str, Any]:
    from .training.trainer import Trainer

    done, last = _finished(cfg)
    if done:
        print(f"[{label}] already trained: {last}")
        return {"train_s": 0.0, "resumed": True}
    trainer = Trainer(cfg)
    if trainer.info.is_main:
        n = len(trainer.train_dataset)
        print(f"[{label}] {cfg.model.preset} at {tuple(cfg.model.input_size)}: {n} training crops, "
              f"{cfg.optim.epochs} epochs x {trainer.iters_per_epoch} steps (batch {cfg.data.batch_size} x {trainer.info.world_size})"
              + (f", resuming {last}" if last else ""))
    try:
        summary = trainer.fit(resume=last)
    finally:
        trainer.close()
    return summary


def measure_throughput(model: torch.nn.Module, device: torch.device, batch: int = 32, seconds: float = 1.5) -> float:
    """Images/s of the model's forward pass (no flip, no decoding), fp32, at ``batch``."""
    model.eval()
    x = torch.randn(batch, 3, *model.input_size, device=device)
    with torch.no_grad():
        model(x)
        n, t0 = 0, time.perf_counter()
        while True:
            model(x)
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if dt >= seconds or n >= 50:
                return n * batch / dt


def evaluate_model(model: torch.nn.Module, val_dataset: Any, batch: int, device: torch.device, flip: bool) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    from .evaluation import coco_keypoint_eval, predict
    from torch.utils.data import DataLoader

    loader = DataLoader(val_dataset, batch_size=batch, shuffle=False, num_workers=0)
    results = predict(model, loader, flip_test=flip, device=device)
    return coco_keypoint_eval(val_dataset.coco, results), results


def write_overlays(val_dataset: Any, results: Dict[str, List[Dict[str, Any]]], out_dir: str, n: int) -> List[str]:
    """Side-by-side teacher | student overlays for the first ``n`` val images."""
    import cv2

    from .evaluation import draw_pose

    os.makedirs(out_dir, exist_ok=True)
    coco = val_dataset.coco
    ids = sorted(coco.getImgIds())[:n]
    written = []
    for img_id in ids:
        info = coco.imgs[img_id]
        img = cv2.imread(os.path.join(val_dataset.img_prefix, info["file_name"]), cv2.IMREAD_COLOR)
        if img is None:
            continue
        panels = []
        for name in ("teacher", "student"):
            canvas = img.copy()
            for r in results[name]:
                if r["image_id"] == img_id and r["score"] > 0.1:
                    canvas = draw_pose(canvas, np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3), kpt_thr=0.2)
            cv2.putText(canvas, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2, cv2.LINE_AA)
            panels.append(canvas)
        both = np.concatenate(panels, axis=1)
        path = os.path.join(out_dir, f"{img_id:06d}.jpg")
        ok, buf = cv2.imencode(".jpg", both, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if ok:
            atomic_write(path, buf.tobytes())
            written.append(path)
    return written


def plot_losses(metric_files: Dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metric_files), figsize=(6 * len(metric_files), 4), squeeze=False)
    for ax, (label, mpath) in zip(axes[0], metric_files.items()):
        recs = []
        if os.path.isfile(mpath):
            with open(mpath) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        recs = [r for r in recs if r.get("type") == "train"]
        keys = sorted({k for r in recs for k in r if k.startswith("loss")})
        for k in keys:
            xs = [r["step"] for r in recs if k in r]
            ys = [r[k] for r in recs if k in r]
            ax.plot(xs, ys, label=k, linewidth=2.0 if k == "loss" else 1.0)
        ax.set_title(f"{label} training loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = os.path.join(staging_dir(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
    replace_into(tmp, path)


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = f"| {'model':<10} | {'preset':<18} | {'AP':>6} | {'AP50':>6} | {'params':>10} | {'GMACs':>6} | {'img/s':>8} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['role']:<10} | {r['preset']:<18} | {r['AP'] * 100:>6.1f} | {r['AP50'] * 100:>6.1f} | "
            f"{r['params'] / 1e6:>9.3f}M | {r['gmacs']:>6.3f} | {r['img_s']:>8.1f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    from .models.complexity import measure_complexity
    from .checkpoint import model_from_checkpoint
    from .training.trainer import build_datasets, setup_distributed

    t_all = time.perf_counter()
    out, note = choose_out_dir(args.out, args.force)
    info = setup_distributed(args.device or "auto")
    out = _bcast(out, info)
    t_cfg, s_cfg = build_configs(args, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif info.device.type == "cpu":
        # leave a core to the data-loader worker(s): on 2 cores, 1 torch thread + 1 worker
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - s_cfg.data.num_workers))
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        if note:
            print(note)
        print(f"distilpose demo -> {os.path.abspath(out)}")

    # 1. data (the embedded set is generated once and cached; a COCO root is used as is)
    t0 = time.perf_counter()
    if t_cfg.data.kind == "demo" and info.is_main:
        from .data import demo as demo_data
        from .training.trainer import ensure_demo_dataset

        root = t_cfg.data.root or demo_data.default_demo_root()
        print(f"[data] embedded dataset: {t_cfg.data.demo_num_train} train / {t_cfg.data.demo_num_val} val images in {root}")
        ensure_demo_dataset(root, t_cfg.data.demo_num_train, t_cfg.data.demo_num_val, t_cfg.data.demo_seed, progress=not args.no_progress)
    _barrier(info)
    data_s = time.perf_counter() - t0

    # 2. teacher, 3. student
    times: Dict[str, float] = {"data_s": data_s}
    budget = args.time_budget if args.time_budget is not None else (0.0 if (args.tiny or args.data_root) else 285.0)

    def left() -> float:
        return budget - (time.perf_counter() - t_all) - 25.0

    if budget > 0:  # the teacher gets 55 % of what is left, the student the rest (each keeps its own guard too)
        t_cfg = _with_budget(t_cfg, 0.55 * left())
    if args.teacher_checkpoint:
        teacher_ckpt = args.teacher_checkpoint
        times["teacher_train_s"] = 0.0
    else:
        t0 = time.perf_counter()
        train_stage(t_cfg, "teacher")
        times["teacher_train_s"] = time.perf_counter() - t0
        best = os.path.join(t_cfg.work_dir, "best.pth")
        teacher_ckpt = best if os.path.isfile(best) else os.path.join(t_cfg.work_dir, "last.pth")
    s_cfg = apply_overrides(s_cfg, {"teacher.checkpoint": teacher_ckpt})
    if budget > 0:
        s_cfg = _with_budget(s_cfg, left())
    t0 = time.perf_counter()
    train_stage(s_cfg, "student")
    times["student_train_s"] = time.perf_counter() - t0
    best = os.path.join(s_cfg.work_dir, "best.pth")
    student_ckpt = best if os.path.isfile(best) else os.path.join(s_cfg.work_dir, "last.pth")

    if not info.is_main:
        _barrier(info)
        return 0
    # 4. evaluation, complexity, speed (rank 0)
    t0 = time.perf_counter()
    device = info.device
    _, val_dataset = build_datasets(s_cfg, with_heatmaps=False)
    rows, results = [], {}
    for role, ckpt, cfg in (("teacher", teacher_ckpt, t_cfg), ("student", student_ckpt, s_cfg)):
        model = model_from_checkpoint(ckpt, device=device)
        metrics, res = evaluate_model(model, val_dataset, cfg.data.val_batch_size, device, flip=cfg.flip_test)
        results[role] = res
        cx = measure_complexity(model.cpu(), name=role)
        model.to(device)
        rows.append(dict(
            role=role, preset=model.name, AP=metrics["AP"], AP50=metrics["AP50"], AP75=metrics["AP75"], AR=metrics["AR"],
            params=cx.params, gmacs=cx.gmacs_paper, img_s=measure_throughput(model, device, *((8, 0.3) if args.tiny else (32, 1.5))),
            checkpoint=os.path.abspath(ckpt),
        ))
    times["eval_s"] = time.perf_counter() - t0
    overlays = write_overlays(val_dataset, results, os.path.join(out, "overlays"), args.num_overlays)
    plot_losses({"teacher": os.path.join(t_cfg.work_dir, "metrics.jsonl"), "student": os.path.join(s_cfg.work_dir, "metrics.jsonl")},
                os.path.join(out, "loss_curves.png"))
    times["total_s"] = time.perf_counter() - t_all

    table = format_table(rows)
    h, w = s_cfg.model.input_size
    print()
    print(f"COCO keypoint AP on the {'COCO val' if s_cfg.data.kind == 'coco' else 'embedded val'} set "
          f"({len(val_dataset)} boxes, {'flip test' if s_cfg.flip_test else 'no flip'}); input {h}x{w}; "
          f"GMACs: conv+linear (paper convention); img/s: fp32 forward, batch {8 if args.tiny else 32}, {device}")
    print(table)
    print(f"time: data {times['data_s']:.0f} s, teacher {times['teacher_train_s']:.0f} s, student {times['student_train_s']:.0f} s, "
          f"eval {times['eval_s']:.0f} s, total {times['total_s']:.0f} s")
    print(f"outputs: {os.path.join(out, 'table.md')}, {os.path.join(out, 'loss_curves.png')}, {len(overlays)} overlays in {os.path.join(out, 'overlays')}")
    atomic_write(os.path.join(out, "table.md"), table + "\n")
    summary = dict(rows=rows, times={k: round(v, 2) for k, v in times.items()}, input_size=[h, w],
                   teacher=t_cfg.to_dict(), student=s_cfg.to_dict(), torch=torch.__version__, device=str(device))
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))  # written last: marks "finished"
    _barrier(info)
    return 0


def _with_budget(cfg: TrainConfig, seconds: float) -> TrainConfig:
    seconds = max(10.0, seconds)
    cur = cfg.max_time_s
    return apply_overrides(cfg, {"max_time_s": round(seconds if cur is None else min(cur, seconds), 1)})


def _barrier(info: Any) -> None:
    if info.distributed:
        torch.distributed.barrier()


def _bcast(obj: Any, info: Any) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
