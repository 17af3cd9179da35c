#!/usr/bin/env python3
"""Generate the README's performance section (Markdown) from the stored benchmark results.

    python scripts/make_perf_table.py                       # print the Markdown
    python scripts/make_perf_table.py --update-readme README.md
        # replaces the text between <!-- perf-table:start --> and <!-- perf-table:end -->

Reads every JSON file under ``bench/results/`` (recursively): pytest-benchmark files
(``{"benchmarks": [...]}``, written by ``pytest bench --benchmark-json`` or by
``scripts/gpu_check.py``) and the GPU check summaries (``gpu_check-<device>.json``, whose
goal table is reproduced). Every number is labelled with the device it was measured on
(from the results' ``extra_info["device"]``); nothing is estimated or filled in. Without GPU
results the section says so; CPU results are tabled, labelled with the CPU's name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def load_results(root: Path) -> Tuple[List[dict], List[dict]]:
    """(benchmarks with _file/_commit/_datetime added, gpu_check summaries)."""
    benches, checks = [], []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"make_perf_table: skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            continue
        if "goals" in data and "stages" in data:
            data["_file"] = str(path.relative_to(root))
            checks.append(data)
            continue
        commit = (data.get("commit_info") or {}).get("id")
        for b in data.get("benchmarks", []) or []:
            b = dict(b)
            b["_file"] = str(path.relative_to(root))
            b["_commit"] = (b.get("extra_info") or {}).get("git_commit") or commit
            b["_datetime"] = data.get("datetime")
            benches.append(b)
    return benches, checks


def info(b: dict, *keys: str, default=None):
    ei = b.get("extra_info") or {}
    for k in keys:
        if k in ei and ei[k] is not None:
            return ei[k]
    return default


def median(b: dict) -> Optional[float]:
    m = info(b, "median_s")
    if m is None:
        m = (b.get("stats") or {}).get("median")
    return float(m) if m else None


def device_of(b: dict) -> str:
    d = info(b, "device")
    if d:
        return str(d)
    return "unknown device"


def is_gpu(device: str) -> bool:
    return not device.startswith("CPU") and device != "unknown device"


def fmt_ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def fmt_num(v: Optional[float], digits: Optional[int] = None) -> str:
    if v is None:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def md_table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    rows = list(rows)
    if not rows:
        return []
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _latest(benches: List[dict]) -> List[dict]:
    """Keep one result per (device, name): the newest file wins."""
    best: Dict[Tuple[str, str], dict] = {}
    for b in benches:
        key = (device_of(b), b.get("fullname") or b.get("name"))
        cur = best.get(key)
        if cur is None or str(b.get("_datetime") or "") >= str(cur.get("_datetime") or ""):
            best[key] = b
    return list(best.values())


def section_e2e(benches: List[dict], device: str) -> List[str]:
    inf = [b for b in benches if "e2e" in b["_file"] or "e2e" in (b.get("name") or "")]
    infer = [b for b in inf if info(b, "preset") and not info(b, "teacher") and median(b)]
    train = [b for b in inf if info(b, "teacher") and median(b)]
    out: List[str] = []
    if infer:
        infer.sort(key=lambda b: (str(info(b, "preset")), info(b, "batch", default=0), str(info(b, "precision")),
                                  not info(b, "flip_test", default=False), median(b)))
        out += [f"End-to-end inference (crop tensor -> keypoints in image pixels, on the host), {device}:", ""]
        out += md_table(
            ["model", "batch", "precision", "flip test", "path", "latency (ms)", "images/s", "peak mem (MiB)"],
            [[info(b, "preset"), info(b, "batch"), info(b, "precision"), "yes" if info(b, "flip_test") else "no",
              info(b, "path", "impl"), fmt_ms(median(b)), fmt_num(info(b, "batch", default=1) / median(b)),
              fmt_num(info(b, "peak_mem_mb"))] for b in infer],
        )
        out.append("")
    if train:
        train.sort(key=lambda b: (str(info(b, "student")), median(b)))
        out += [f"Distillation training step (student + frozen teacher, Adam), {device}:", ""]
        out += md_table(
            ["student + teacher", "batch", "precision", "ops", "step (ms)", "images/s", "peak mem (MiB)"],
            [[f"{info(b, 'student')} + {info(b, 'teacher')}", info(b, "batch"), info(b, "precision"),
              info(b, "path", "impl"), fmt_ms(median(b)), fmt_num(info(b, "batch", default=1) / median(b)),
              fmt_num(info(b, "peak_mem_mb"))] for b in train],
        )
        out.append("")
    return out


def section_ops(benches: List[dict], device: str) -> List[str]:
    out: List[str] = []
    groups = defaultdict(list)
    for b in benches:
        if "e2e" in b["_file"] or not median(b):
            continue
        label = b.get("group") or info(b, "op") or b["_file"]
        for key, fmt in (("encoding", " {}"), ("n", " N={}")):
            value = info(b, key)
            if value is not None and fmt.format(value).strip() not in label:
                label += fmt.format(value)
        groups[label].append(b)
    rows = []
    for group in sorted(groups):
        for b in sorted(groups[group], key=median):
            tput = []
            if info(b, "tflops") is not None:
                tput.append(f"{info(b, 'tflops'):.1f} TFLOP/s")
            if info(b, "gbps") is not None:
                tput.append(f"{info(b, 'gbps'):.0f} GB/s")
            rows.append([group, info(b, "impl", default=b.get("name")), fmt_ms(median(b)), ", ".join(tput) or "-"])
    if rows:
        out += [f"Fused ops vs baselines, {device} (median):", ""]
        out += md_table(["benchmark", "implementation", "median (ms)", "throughput"], rows)
        out.append("")
    return out


def _goal_tables(checks: List[dict]) -> List[dict]:
    """Per device: the combined summaries (``gpu_check.py --combine``) if any, else every run."""
    by_dev: Dict[str, List[dict]] = defaultdict(list)
    for c in checks:
        by_dev[str(c.get("device"))].append(c)
    out: List[dict] = []
    for dev in sorted(by_dev):
        combined = [c for c in by_dev[dev] if c.get("combined_from")]
        out += combined or by_dev[dev]
    return out


def section_goals(checks: List[dict]) -> List[str]:
    out: List[str] = []
    for c in sorted(_goal_tables(checks), key=lambda c: c.get("_file", "")):
        if not c.get("has_gpu"):
            continue
        dev = c.get("device", "unknown device")
        ceil = c.get("ceilings") or {}
        env = c.get("env") or {}
        commit = str(env.get("git_commit", "?"))
        commit = commit if " " in commit else commit[:10]  # a combined table names several commits
        out += [f"Speed goals on {dev} (`scripts/gpu_check.py`, commit {commit}, "
                f"torch {env.get('torch', '?')}; measured ceilings: copy {fmt_num(ceil.get('copy_gbps'))} GB/s, "
                f"bf16 matmul {fmt_num(ceil.get('bf16_tflops'))} TFLOP/s, fp32 {fmt_num(ceil.get('fp32_tflops'))} TFLOP/s):", ""]
        out += md_table(["goal", "target", "status", "measured", "floor (two numbers)"],
                        [[g["goal"], g["target"], g["status"], g["measured"], g.get("floor") or "-"]
                         for g in c.get("goals", [])])
        out.append("")
    return out


def build_markdown(root: Path) -> str:
    benches, checks = load_results(root)
    benches = _latest(benches)
    by_dev: Dict[str, List[dict]] = defaultdict(list)
    for b in benches:
        by_dev[device_of(b)].append(b)
    gpu_devs = sorted(d for d in by_dev if is_gpu(d))
    cpu_devs = sorted(d for d in by_dev if not is_gpu(d))
    lines = ["### Measured performance", "",
             f"_Generated by `python scripts/make_perf_table.py` from `bench/results/` "
             f"({len(benches)} results); every number names the device it was measured on._", ""]
    goal_lines = section_goals(checks)
    if not gpu_devs and not goal_lines:
        lines += ["**No GPU results yet.** No benchmark in `bench/results/` was measured on a GPU, so this "
                  "README claims no GPU speed. Run `bash scripts/gpu_check.sh` on a CUDA machine (H100/H200) and "
                  "commit its JSON files under `bench/results/` to fill this section.", ""]
    lines += goal_lines
    for dev in gpu_devs:
        lines += section_e2e(by_dev[dev], dev) + section_ops(by_dev[dev], dev)
    for dev in cpu_devs:
        threads = sorted({str(info(b, "cpu_threads")) for b in by_dev[dev] if info(b, "cpu_threads") is not None})
        th = f", torch threads {'/'.join(threads)}" if threads else ""
        lines += [f"CPU results ({dev}{th}; indicative only, not a speed claim):", ""]
        lines += section_e2e(by_dev[dev], dev) + section_ops(by_dev[dev], dev)
    if not benches and not checks:
        lines += ["(No benchmark results are stored in `bench/results/`.)", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, text: str) -> None:
    src = readme.read_text()
    if START not in src or END not in src:
        raise SystemExit(f"make_perf_table: {readme} has no {START} ... {END} markers")
    head, rest = src.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + text + END + tail
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="README performance table from bench/results/*.json")
    ap.add_argument("--results", default=str(REPO / "bench" / "results"), help="results folder (searched recursively)")
    ap.add_argument("--update-readme", default=None, metavar="README.md",
                    help="replace the text between the perf-table markers in this file")
    ap.add_argument("--out", default=None, help="write the Markdown to this file instead of stdout")
    args = ap.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        raise SystemExit(f"make_perf_table: no results folder {root}")
    text = build_markdown(root)
    if args.update_readme:
        update_readme(Path(args.update_readme), text)
        print(f"updated {args.update_readme}")
    elif args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
