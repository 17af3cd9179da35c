"""Distiller: a regression student trained from a frozen heatmap teacher (the spec's five losses)."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import annotate

from ..losses import keypoint_regression_loss, token_mse_loss
from .pose import TokenPoseModel

PARTS = ("token", "reg2hm", "score")


@dataclass
class LossWeights:
    """Loss weights as released (spec, 'Losses of the student')."""

    kpt: float = 1.0
    vis_token: float = 0.0005
    kpt_token: float = 0.0005
    reg2hm: float = 1.0
    score: float = 0.01


class Distiller(nn.Module):
    """Student + frozen teacher. ``forward(batch)`` returns the dict of weighted loss terms.

    The teacher is held outside the module tree: it is not in ``parameters()`` or
    ``state_dict()``, always stays in eval mode, and runs under ``torch.no_grad()``.
    ``disable`` switches parts off: "token" (both token MSEs), "reg2hm", "score".
    Without a teacher only the keypoint regression term is computed.

    Frozen-teacher speed-ups (the teacher's forward is most of a distillation step):
    ``fold_teacher_bn`` folds its conv+BN pairs (exact up to rounding: the teacher is in eval
    mode), and then, unless ``fuse_teacher_epilogues`` is False, fuses each conv's bias,
    residual add and ReLU into the conv (``distilpose.fuse.fuse_conv_epilogues``, HRNet's
    multi-resolution sums included) and turns on the TDE's fused residual norms and MLP GELU;
    ``teacher_dtype`` (torch.bfloat16 / torch.float16) stores it in that dtype and runs it on
    inputs cast to it, outside autocast (no per-op casts each step);
    ``teacher_channels_last`` stores its conv weights channels-last (cuDNN's preferred layout
    for 16-bit convolutions; activations follow the weights); ``teacher_cuda_graph`` runs the
    teacher's forward as a CUDA graph, captured once per input shape / dtype / autocast state
    (CUDA inputs only; elsewhere it runs eagerly). Graph outputs are copied out of the graph's
    buffers, so results of earlier calls stay valid. Each works on a copy: the caller's
    teacher is never modified.
    """

    def __init__(
        self,
        student: TokenPoseModel,
        teacher: Optional[TokenPoseModel] = None,
        weights: Optional[LossWeights] = None,
        reg2hm_mode: str = "released",
        disable: Iterable[str] = (),
        loss_backend: Optional[str] = None,
        fold_teacher_bn: bool = False,
        teacher_dtype: Optional[torch.dtype] = None,
        fuse_teacher_epilogues: bool = True,
        teacher_channels_last: bool = False,
        teacher_cuda_graph: bool = False,
    ):
        super().__init__()
        if getattr(student, "kind", None) != "student":
            raise ValueError("student: expected a regression model (kind 'student')")
        if teacher is not None and getattr(teacher, "kind", None) != "teacher":
            raise ValueError("teacher: expected a heatmap model (kind 'teacher')")
        disable = set(disable)
        unknown = disable - set(PARTS)
        if unknown:
            raise ValueError(f"disable: unknown parts {sorted(unknown)}; choose from {PARTS}")
        if reg2hm_mode not in ("released", "per_sample"):
            raise ValueError(f"reg2hm_mode: expected 'released' or 'per_sample', got {reg2hm_mode!r}")
        self.student = student
        self.weights = weights or LossWeights()
        self.reg2hm_mode = reg2hm_mode
        self.disable = disable
        self.loss_backend = loss_backend
        if teacher_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"teacher_dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, got {teacher_dtype!r}")
        self.fold_teacher_bn = bool(fold_teacher_bn)
        self.teacher_dtype = teacher_dtype
        self.fuse_teacher_epilogues = bool(fuse_teacher_epilogues)
        self.teacher_channels_last = bool(teacher_channels_last)
        self.teacher_cuda_graph = bool(teacher_cuda_graph)
        self._teacher_graphs: Dict[tuple, tuple] = {}
        self._graph_pool = None
        self.set_teacher(teacher)

    # -- teacher handling: outside the module tree, frozen, eval mode
    def set_teacher(self, teacher: Optional[TokenPoseModel]) -> None:
        if teacher is not None:
            if teacher.num_keypoints != self.student.num_keypoints:
                raise ValueError("teacher: keypoint count differs from the student's")
            copied = (self.fold_teacher_bn or self.teacher_dtype is not None or self.teacher_channels_last
                      or self.teacher_cuda_graph)
            if copied:
                teacher = copy.deepcopy(teacher)
                if hasattr(teacher, "check_finite"):
                    teacher.check_finite = False  # the student already checked the same images (a host sync)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if self.fold_teacher_bn:
                from ..fuse import fuse_conv_bn_model, fuse_conv_epilogues, set_tde_fusions

                teacher = fuse_conv_bn_model(teacher, inplace=True)
                if self.fuse_teacher_epilogues:
                    teacher = fuse_conv_epilogues(teacher, inplace=True)
                    # and the TDE's inference fusions, as InferenceEngine (each op keeps its fused
                    # path only where timed faster)
                    set_tde_fusions(teacher, fuse_pos_norm=True, fuse_add_norm=True, fuse_gelu=True, mlp_kernel=True)
            if self.teacher_dtype is not None:
                teacher.to(self.teacher_dtype)
            if self.teacher_channels_last:
                teacher.to(memory_format=torch.channels_last)
        self.__dict__["_teacher"] = teacher  # bypass nn.Module registration on purpose
        self.reset_teacher_graphs()

    def __getstate__(self):
        # copies and pickles start without captured graphs (CUDAGraph objects cannot be copied)
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_teacher_graphs"] = {}
        state["_graph_pool"] = None
        return state

    def reset_teacher_graphs(self) -> None:
        """Drop the captured teacher graphs (their memory pool is freed with them)."""
        self._teacher_graphs.clear()
        self._graph_pool = None

    @property
    def teacher(self) -> Optional[TokenPoseModel]:
        return self.__dict__["_teacher"]

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
            if self.teacher_dtype is not None:  # e.g. distiller.float(): the teacher keeps its dtype
                self.teacher.to(self.teacher_dtype)
            if self.teacher_channels_last:  # and its layout
                self.teacher.to(memory_format=torch.channels_last)
        self.reset_teacher_graphs()  # parameters may have moved: captured graphs would read the old ones
        return self

    def active_weights(self) -> Dict[str, float]:
        w = asdict(self.weights)
        if self.teacher is None:
            return {"kpt": w["kpt"]}
        if "token" in self.disable:
            w["vis_token"] = w["kpt_token"] = 0.0
        if "reg2hm" in self.disable:
            w["reg2hm"] = 0.0
        if "score" in self.disable:
            w["score"] = 0.0
        return {k: v for k, v in w.items() if v != 0.0}

    @annotate("distilpose.distiller")
    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        img = batch["img"]
        out = self.student(img)
        w = self.active_weights()
        losses: Dict[str, torch.Tensor] = {}
        losses["loss_kpt"] = w.get("kpt", 0.0) * keypoint_regression_loss(
            out["coords"], batch["target_coords"], batch["target_weight"]
        )
        if self.teacher is not None and any(k != "kpt" for k in w):  # some distillation term is on
            with torch.no_grad():
                if self.teacher_dtype is None:
                    t = self._run_teacher(img)
                else:  # the teacher is stored in teacher_dtype: no autocast, no per-op casts
                    with torch.autocast(img.device.type, enabled=False):
                        t = self._run_teacher(img.to(self.teacher_dtype))
            if "vis_token" in w:
                losses["loss_vis_token"] = w["vis_token"] * token_mse_loss(out["vis_tokens"], t["vis_tokens"])
            if "kpt_token" in w:
                losses["loss_kpt_token"] = w["kpt_token"] * token_mse_loss(out["kpt_tokens"], t["kpt_tokens"])
            if "reg2hm" in w or "score" in w:
                reg2hm, score = dk.simulated_heatmap_loss(
                    out["coords"],
                    out["sigma"],
                    out["score"],
                    t["heatmaps"],
                    batch["target_weight"],
                    mode=self.reg2hm_mode,
                    backend=self.loss_backend,
                )
                if "reg2hm" in w:
                    losses["loss_reg2hm"] = w["reg2hm"] * reg2hm
                if "score" in w:
                    losses["loss_score"] = w["score"] * score
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _run_teacher(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not (self.teacher_cuda_graph and img.is_cuda) or torch.cuda.is_current_stream_capturing():
            return self.teacher(img)
        dev = img.device.type
        key = (tuple(img.shape), img.stride(), img.dtype, img.device,
               torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        entry = self._teacher_graphs.get(key)
        if entry is None:
            entry = self._capture_teacher(img)
            self._teacher_graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(img)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _capture_teacher(self, img: torch.Tensor) -> tuple:
        static_in = img.clone()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph, static_out = dk.capture_cuda_graph(lambda: self.teacher(static_in), warmup=2, pool=self._graph_pool,
                                                  device=img.device)
        return graph, static_in, static_out

    def parameters_student(self) -> Iterator[nn.Parameter]:
        return self.student.parameters()
