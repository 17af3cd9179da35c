"""`distilpose smoke`: build a preset, print its size table, run forward/backward on random crops."""
from __future__ import annotations

import argparse
import time

import torch

from .models import build_model
from .models.complexity import HEADER, measure_complexity


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="distilpose_s")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    model = build_model(args.preset).to(args.device)
    print(HEADER)
    print(measure_complexity(model, name=args.preset).row())
    model.train()
    img = torch.randn(args.batch, 3, *model.input_size, device=args.device)
    t0 = time.perf_counter()
    out = model(img)
    loss = sum(v.float().pow(2).mean() for k, v in out.items())
    loss.backward()
    dt = time.perf_counter() - t0
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
    grads = sum(p.grad is not None for p in model.parameters())
    print(f"forward+backward batch {args.batch} on {args.device}: {dt * 1e3:.0f} ms; outputs: {shapes}")
    print(f"gradients reached {grads}/{sum(1 for _ in model.parameters())} parameter tensors")
    return 0
