"""Low-level inference engine: preprocessed crops in, keypoints in image pixels out.

``InferenceEngine`` wraps a DistilPose student (regression) or TokenPose teacher (heatmaps)
for fast inference:

- eval mode, optional conv+BN folding (:mod:`distilpose.fuse`), optional channels-last;
- fp32, or bf16/fp16 through autocast;
- flip test (mirror the crop, swap left/right keypoints; regression: ``x' = 1 - x``;
  heatmaps: mirror back with the one-pixel shift), the two passes batched into one forward
  by default (``flip_batched=False`` runs two forwards, the paper's setting);
- decoding: student coordinates are crop-normalised; teacher heatmaps go through
  ``distilpose_kernels.decode_heatmaps`` (argmax + DARK by default); then crop pixels ->
  image pixels with the data pipeline's convention
  (``x_img = center + R(rot) ((x_crop - crop_size / 2) * scale / crop_size)``);
- optional ``torch.compile`` of the whole step and optional CUDA-graph capture per input
  shape (static input buffers, replayed; the whole step, decoding included, is one graph).

The engine is image-agnostic: cropping images into normalised tensors is the job of the
data pipeline / :mod:`distilpose.inference`.

Example::

    engine = InferenceEngine(build_model("distilpose_s"), device="cuda", cuda_graph=True)
    out = engine(crops, center, scale)          # crops (N, 3, 256, 192) normalised
    out["keypoints"], out["scores"]             # (N, K, 2) image px, (N, K)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import distilpose_kernels as dk
from distilpose_kernels import annotate
from distilpose_kernels import keypoints as _kp

__all__ = [
    "COCO_FLIP_PAIRS",
    "InferenceEngine",
    "crop_to_image",
    "flip_back_heatmaps",
    "flip_back_regression",
    "flip_index",
]

#: Left/right keypoint pairs of COCO-17 (swapped by a horizontal flip).
#: int32 counters an engine lends its split GEMM tiles (``distilpose_kernels.split_counters``): the
#: most any of them needs at batch 1 is 162 (546 x 576 in 32 x 64 tiles); larger calls get their own
SPLIT_COUNTS_SIZE = 4096
COCO_FLIP_PAIRS: Tuple[Tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def flip_index(num_keypoints: int, flip_pairs: Sequence[Tuple[int, int]] = COCO_FLIP_PAIRS) -> list:
    """Permutation ``perm`` with ``x[:, perm]`` swapping every left/right pair."""
    perm = list(range(num_keypoints))
    for a, b in flip_pairs:
        if not (0 <= a < num_keypoints and 0 <= b < num_keypoints):
            raise ValueError(f"flip_pairs: pair {(a, b)} out of range for {num_keypoints} keypoints")
        perm[a], perm[b] = b, a
    return perm


def _perm_index(perm: Union[Sequence[int], torch.Tensor], device: torch.device) -> torch.Tensor:
    if isinstance(perm, torch.Tensor):
        return perm if perm.device == device else perm.to(device)
    return torch.tensor(list(perm), dtype=torch.long, device=device)


@annotate("distilpose.decode.flip_back")
def flip_back_regression(coords: torch.Tensor, perm: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    """Crop-normalised coords (N, K, 2) predicted on a mirrored crop -> the original crop.

    ``perm``: the left/right permutation (a list, or a long tensor on the coords' device,
    which keeps the function free of host-to-device copies, e.g. inside a CUDA graph).
    """
    return _kp.flip_back_regression(coords, _perm_index(perm, coords.device))


@annotate("distilpose.decode.flip_back")
def flip_back_heatmaps(
    heatmaps: torch.Tensor, perm: Union[Sequence[int], torch.Tensor], shift: bool = True
) -> torch.Tensor:
    """Heatmaps (N, K, H, W) of a mirrored crop -> the original crop (mmpose ``flip_back``).

    ``shift``: move the mirrored maps one pixel to the right (mmpose's ``shift_heatmap``),
    which compensates the pixel-centre offset of the mirror.
    """
    hm = heatmaps.flip(-1).index_select(1, _perm_index(perm, heatmaps.device))
    if shift:
        hm = torch.cat((hm[..., :1], hm[..., :-1]), dim=-1)
    return hm


@annotate("distilpose.decode.to_image")
def crop_to_image(
    coords: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    rotation: Optional[torch.Tensor],
    crop_size: Tuple[int, int],
) -> torch.Tensor:
    """Crop pixels (N, K, 2) -> image pixels, inverting the data pipeline's affine crop.

    center (N, 2) image px; scale (N, 2) box w, h in px (the crop's full extent);
    rotation (N,) degrees or None (no rotation); crop_size (H, W). Computed in the coords'
    dtype, with no host-to-device copies (CUDA-graph safe).
    """
    return _kp.crop_to_image(coords, center, scale, rotation, crop_size)


#: torch._foreach_copy_ (PyTorch >= 2.1): copies a list of tensors in one multi-tensor launch
#: where dtypes and devices match (per-tensor copies otherwise, the same result)
_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def _to_device_together(kp: torch.Tensor, sc: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keypoints (N, K, 2), scores (N, K)) on ``device`` in one copy: at batch 1 each
    device-to-host copy is a synchronisation. When the two are adjacent in one buffer (as
    ``regression_to_image`` allocates them) that buffer is copied as is; else they are packed
    first (one kernel). The results are new tensors (never graph buffers)."""
    if kp.device.type == device.type and device.index in (None, kp.device.index):  # "cuda" means cuda:N too
        return kp.clone(), sc.clone()
    n, k = sc.shape
    nk2 = kp.numel()
    adjacent = (kp.is_contiguous() and sc.is_contiguous() and kp.dtype == sc.dtype
                and kp.untyped_storage().data_ptr() == sc.untyped_storage().data_ptr()
                and sc.storage_offset() == kp.storage_offset() + nk2)
    flat = (kp.as_strided((nk2 + sc.numel(),), (1,)) if adjacent
            else torch.cat((kp.reshape(-1), sc.reshape(-1).to(kp.dtype))))
    host = flat.to(device, copy=True)  # a new tensor even if .to would not need to move it
    return host[:nk2].view(n, k, 2), host[nk2:].view(n, k).to(sc.dtype)


def _set_attention_backend(model: nn.Module, backend: Optional[str]) -> None:
    for m in model.modules():
        if hasattr(m, "backend") and (m.backend is None or isinstance(m.backend, str)):
            m.backend = backend


class InferenceEngine:
    """Fast batched inference for a :class:`~distilpose.models.TokenPoseModel`.

    Args:
        model: a student (``kind == "student"``) or teacher model; it is deep-copied when
            BN folding or a device/layout change would otherwise modify it.
        device: where to run (default: the model's device).
        precision: "fp32", "bf16" or "fp16" (autocast; inputs and outputs stay fp32).
        cast_model: with bf16/fp16, store the model's weights in that dtype and run it on
            inputs cast to it, without autocast: no per-op casts, LayerNorm and the residual
            stream in that dtype (fp32 math inside the kernels). Faster at large batches;
            results differ from autocast by that dtype's rounding. Outputs stay fp32.
        flip_test: average with the mirrored crop.
        flip_batched: run the crop and its mirror as one batch of 2N (else two forwards).
        flip_pairs: left/right keypoint pairs (COCO-17 by default).
        fold_bn: fold conv+BN pairs (the paper's speed was measured without folding).
        fuse_epilogues: after folding, run each conv's bias, residual add and ReLU inside the
            conv (``distilpose.fuse.fuse_conv_epilogues``; cuDNN's fused kernel on CUDA where
            it is measured faster). Default: on with ``fold_bn`` unless ``compile``.
        channels_last: convert the model and inputs to channels-last memory format.
        fuse_pos_norm: run each of the TDE's "residual add (+ position re-add), then LayerNorm"
            steps as one fused op (``distilpose_kernels.add_pos_layernorm``) instead of add,
            slice-add, cat and LayerNorm (8 instead of 12 kernels per layer). Default: on unless
            ``compile`` (Inductor fuses those itself).
        fuse_mlp: run each TDE MLP's fc1 + bias + GELU as one kernel
            (``distilpose_kernels.linear_gelu``, used on CUDA where it is timed faster than
            cuBLAS + GELU). Default: on unless ``compile``.
        triton_linears: run the TDE's other Linears (qkv, proj, fc2) through
            ``distilpose_kernels.linear``: per shape, the Triton GEMM where it was timed faster
            than cuBLAS and agreed with it. For fp32 its dots are 3xTF32 on the tensor cores at
            fp32 accuracy (``distilpose_kernels.fp32_dot_precision``), where cuBLAS runs FMA
            kernels with TF32 off. Default: on for precision "fp32" unless ``compile`` (16-bit
            GEMMs already run on the tensor cores in cuBLAS; timing them only costs compiles).
        fuse_add_norm: run the TDE's residual adds, position re-adds and LayerNorms in the
            epilogues of the attention projection and of the MLP's last GEMM
            (``distilpose_kernels.linear_add_norm`` / ``fused_mlp_add_norm``, each used on CUDA
            where it is timed faster than its reference ops): 4 to 5 kernels per layer instead of
            7, and neither GEMM output goes to memory on its own. Takes precedence over
            ``fuse_pos_norm``. Default: on unless ``compile``.
        mlp_kernel: run each TDE MLP (fc1, GELU, fc2) through ``distilpose_kernels.fused_mlp``
            / ``fused_mlp_add_norm``, whose "auto" times three ways once per shape: one kernel
            (the 576-wide hidden activation never written; at batch 1 its split tiles), the
            reference ops, and ``linear_gelu`` + ``linear(_add_norm)`` (two GEMMs, each with its
            own choice); it replaces ``fuse_mlp`` / ``triton_linears`` inside the MLP. Default:
            on unless ``compile``.
        fuse_qkv: run each TDE attention's qkv projection inside the attention kernel
            (``distilpose_kernels.qkv_attention``: no (N, L, 3C) qkv tensor, one launch instead
            of two; used on CUDA where it is timed faster than the Linear + attention ops).
            Default: on unless ``compile``.
        attention_backend: set on every module with a ``backend`` attribute (the TDE's
            attention): None/"auto", "reference" or "triton".
        compile: ``torch.compile`` the step (``compile_mode``, e.g. "default", "max-autotune-no-cudagraphs").
        cuda_graph: capture the step as a CUDA graph per input shape and replay it
            (CUDA only; the model must be capturable: no host syncs in forward).
        decode: teacher heatmap decoding method for ``distilpose_kernels.decode_heatmaps``
            ("dark" or "argmax"); ``dark_kernel`` its Gaussian kernel size.
        heatmap_shift: the one-pixel shift of flipped heatmaps (teacher flip test).
        clone_outputs: copy graph outputs out of the static buffers (set False to save a
            copy when each result is consumed before the next call).
        pdl: programmatic dependent launch of the fused ops' Triton kernels (sm_90+;
            ``distilpose_kernels.programmatic_launch``): each kernel may be scheduled while the
            previous one finishes, which hides the launch gaps of batch-1 inference. None: with
            ``cuda_graph``, each graph is captured with and without it and the faster is kept if
            both give bit-identical outputs (``capture_cuda_graph(pdl="auto")``, recorded in
            ``auto_choices``); without, ``DISTILPOSE_PDL`` decides. True / False: on / off.
    """

    def __init__(
        self,
        model: nn.Module,
        device: Optional[Union[str, torch.device]] = None,
        precision: str = "fp32",
        cast_model: bool = False,
        flip_test: bool = True,
        flip_batched: bool = True,
        flip_pairs: Sequence[Tuple[int, int]] = COCO_FLIP_PAIRS,
        fold_bn: bool = False,
        fuse_epilogues: Optional[bool] = None,
        channels_last: bool = False,
        fuse_pos_norm: Optional[bool] = None,
        fuse_mlp: Optional[bool] = None,
        triton_linears: Optional[bool] = None,
        fuse_add_norm: Optional[bool] = None,
        mlp_kernel: Optional[bool] = None,
        fuse_qkv: Optional[bool] = None,
        attention_backend: Optional[str] = None,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        cuda_graph: bool = False,
        decode: str = "dark",
        dark_kernel: int = 11,
        heatmap_shift: bool = True,
        clone_outputs: bool = True,
        pdl: Optional[bool] = None,
    ):
        if precision not in _DTYPES:
            raise ValueError(f"precision: expected one of {sorted(_DTYPES)}, got {precision!r}")
        kind = getattr(model, "kind", None)
        if kind not in ("student", "teacher"):
            raise ValueError("model: expected a TokenPoseModel (kind 'student' or 'teacher')")
        if decode not in ("dark", "argmax"):
            raise ValueError(f"decode: expected 'dark' or 'argmax', got {decode!r}")
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device: {device!r} requested but CUDA is not available")
        if attention_backend not in (None, "auto", "reference", "triton"):
            raise ValueError(f"attention_backend: expected None, 'auto', 'reference' or 'triton', got {attention_backend!r}")
        if pdl not in (None, True, False):
            raise ValueError(f"pdl: expected None, True or False, got {pdl!r}")
        if compile_mode is not None and not compile:
            raise ValueError("compile_mode: only used with compile=True")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, the engine runs on {self.device}")

        model = copy.deepcopy(model)  # never modify the caller's model (eval, folding, backend, layout)
        model.eval()
        if fold_bn:
            from .fuse import fuse_conv_bn_model

            model = fuse_conv_bn_model(model, inplace=True)
        if fuse_epilogues is None:
            fuse_epilogues = fold_bn and not compile
        if fuse_epilogues:
            if not fold_bn:
                raise ValueError("fuse_epilogues: needs fold_bn=True (the BatchNorms sit between conv and ReLU)")
            from .fuse import fuse_conv_epilogues

            model = fuse_conv_epilogues(model, inplace=True)
        self.fuse_pos_norm = (not compile) if fuse_pos_norm is None else bool(fuse_pos_norm)
        self.fuse_mlp = (not compile) if fuse_mlp is None else bool(fuse_mlp)
        if triton_linears is None:
            triton_linears = precision == "fp32" and not compile
        self.triton_linears = bool(triton_linears)
        self.fuse_add_norm = (not compile) if fuse_add_norm is None else bool(fuse_add_norm)
        if mlp_kernel is None:
            mlp_kernel = not compile
        self.mlp_kernel = bool(mlp_kernel)
        self.fuse_qkv = (not compile) if fuse_qkv is None else bool(fuse_qkv)
        from .fuse import set_tde_fusions

        set_tde_fusions(model, fuse_pos_norm=self.fuse_pos_norm, fuse_add_norm=self.fuse_add_norm,
                        fuse_gelu=self.fuse_mlp, triton_linears=self.triton_linears, mlp_kernel=self.mlp_kernel,
                        fuse_qkv=self.fuse_qkv)
        if attention_backend is not None:
            _set_attention_backend(model, None if attention_backend == "auto" else attention_backend)
        from .models.heads import RegressionHead

        for m in model.modules():  # the student's head as one kernel on CUDA (regression_head)
            if isinstance(m, RegressionHead):
                m.fused = True
        if hasattr(model, "check_finite"):
            model.check_finite = False  # a host sync per call; inputs come from our own pipeline
        model.to(self.device)
        self.cast_model = bool(cast_model) and _DTYPES[precision] != torch.float32
        if self.cast_model:
            model.to(_DTYPES[precision])
        if channels_last:
            model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)

        self.model = model
        self.kind = kind
        self.input_size: Tuple[int, int] = tuple(getattr(model, "input_size", (256, 192)))  # type: ignore[assignment]
        self.heatmap_size: Tuple[int, int] = tuple(getattr(model, "heatmap_size", (64, 48)))  # type: ignore[assignment]
        self.num_keypoints = int(getattr(model, "num_keypoints", 17))
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.flip_test = flip_test
        self.flip_batched = flip_batched
        self.perm = flip_index(self.num_keypoints, flip_pairs)
        self._perm_t = torch.tensor(self.perm, dtype=torch.long, device=self.device)
        self._defaults: Dict[tuple, torch.Tensor] = {}
        self.channels_last = channels_last
        self.decode = decode
        self.dark_kernel = dark_kernel
        self.heatmap_shift = heatmap_shift
        self.fold_bn = fold_bn
        self.fuse_epilogues = bool(fuse_epilogues)
        self.cuda_graph = cuda_graph
        self.pdl = pdl
        self.clone_outputs = clone_outputs
        self.compiled = bool(compile)
        self._step: Callable = self._forward_decode
        if compile:
            kwargs = {} if compile_mode is None else {"mode": compile_mode}
            self._step = torch.compile(self._forward_decode, dynamic=False, **kwargs)
        self._graphs: Dict[tuple, tuple] = {}
        self._pool = None
        # the split GEMM tiles (batch-1 latency) count their programs here, not in a zeroed
        # tensor per call: no fill kernel per GEMM in the step or its CUDA graph. One per
        # engine: the engine (static graph buffers included) is not reentrant anyway.
        self._split_counts = (torch.zeros(SPLIT_COUNTS_SIZE, dtype=torch.int32, device=self.device)
                              if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the step

    def _autocast(self):
        if self.dtype == torch.float32 or self.cast_model:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _model_out(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.cast_model:
            img = img.to(self.dtype)
        with self._autocast():
            return self.model(img)

    def _forward_decode(
        self, img: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, rotation: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """crops (N, 3, H, W) -> (keypoints (N, K, 2) image px fp32, scores (N, K) fp32)."""
        n = img.shape[0]
        key = "coords" if self.kind == "student" else "heatmaps"
        if self.flip_test:
            flipped = img.flip(-1)
            if self.flip_batched:
                both = self._model_out(torch.cat((img, flipped), dim=0))
                out, out_f = both[key][:n], both[key][n:]
                extra = both["score"] if self.kind == "student" else None
                s, s_f = (extra[:n], extra[n:]) if extra is not None else (None, None)
            else:
                o1, o2 = self._model_out(img), self._model_out(flipped)
                out, out_f = o1[key], o2[key]
                s, s_f = (o1["score"], o2["score"]) if self.kind == "student" else (None, None)
        else:
            o = self._model_out(img)
            out, out_f = o[key], None
            s, s_f = (o["score"], None) if self.kind == "student" else (None, None)

        h, w = self.input_size
        if self.kind == "student":  # merge, crop pixels and the inverse affine: one kernel on CUDA
            flip = {} if out_f is None else dict(flipped_coords=out_f, flipped_scores=s_f[..., 0],
                                                 flip_perm=self._perm_t)
            return dk.regression_to_image(out, s[..., 0], center, scale, self.input_size, rotation, **flip)
        hm = out.float()
        if out_f is not None:
            hm = (hm + flip_back_heatmaps(out_f.float(), self._perm_t, self.heatmap_shift)) * 0.5
        crop_px, scores = self._decode_heatmaps(hm)
        return crop_to_image(crop_px, center, scale, rotation, self.input_size), scores

    def _decode_heatmaps(self, hm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"method": self.decode}
        if self.decode == "dark":
            kwargs["kernel"] = self.dark_kernel
        coords, maxvals = dk.decode_heatmaps(hm, **kwargs)
        hh, hw = hm.shape[-2:]
        h, w = self.input_size
        crop_px = _kp.scale_xy(coords.float(), w / hw, h / hh)
        return crop_px, maxvals.float().reshape(hm.shape[0], hm.shape[1])

    # ------------------------------------------------------------------ public API

    def _input_spec(self) -> Tuple[torch.dtype, torch.memory_format]:
        """The model input's dtype and layout: the model's dtype for a cast model (so that no
        cast runs inside the step; the flip and the batching concatenation are exact in any
        dtype), else float32 (autocast casts inside); channels-last when the model is."""
        return (self.dtype if self.cast_model else torch.float32,
                torch.channels_last if self.channels_last else torch.contiguous_format)

    def _prepare(self, crops, center, scale, rotation):
        if not isinstance(crops, torch.Tensor):
            raise TypeError(f"crops: expected a torch.Tensor, got {type(crops).__name__}")
        h, w = self.input_size
        if crops.dim() != 4 or crops.shape[1] != 3 or tuple(crops.shape[2:]) != (h, w):
            raise ValueError(f"crops: expected (N, 3, {h}, {w}) normalised crops, got {tuple(crops.shape)}")
        if not crops.is_floating_point():
            raise TypeError(f"crops: expected a floating-point tensor, got {crops.dtype}")
        n = crops.shape[0]
        dev = self.device
        # CUDA graphs: the copy into the graph's input buffer converts (one kernel, in _replay)
        dtype, fmt = self._input_spec()
        img = crops if self.cuda_graph else crops.to(dev, dtype, non_blocking=True, memory_format=fmt)

        def as_t(name, v, default, shape):
            if v is None:
                key = (name, n)
                t = self._defaults.get(key)
                if t is None:  # cached on the device: no host-to-device copy per call
                    t = torch.tensor(default, dtype=torch.float32, device=dev).expand(shape).contiguous()
                    self._defaults[key] = t
                return t
            t = torch.as_tensor(v, dtype=torch.float32)
            if t.device.type == "cpu":  # checked on the host (no device sync); device tensors are trusted
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name}: contains NaN or inf")
                if name == "scale" and not bool((t > 0).all()):
                    raise ValueError("scale: box width and height must be positive")
            t = t.to(dev, non_blocking=True)
            if t.shape == shape[1:]:
                t = t.expand(shape).contiguous()
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape} (or {shape[1:]}), got {tuple(t.shape)}")
            return t

        c = as_t("center", center, [w / 2.0, h / 2.0], (n, 2))
        s = as_t("scale", scale, [float(w), float(h)], (n, 2))
        r = None if rotation is None else as_t("rotation", rotation, 0.0, (n,))
        return img, c, s, r

    @torch.inference_mode()
    def __call__(
        self,
        crops: torch.Tensor,
        center: Optional[torch.Tensor] = None,
        scale: Optional[torch.Tensor] = None,
        rotation: Optional[torch.Tensor] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Keypoints of normalised crops.

        crops (N, 3, H, W); center (N, 2) / scale (N, 2) image px (box centre and padded
        box size, as the dataset's meta gives them) and rotation (N,) degrees; a (2,) or
        scalar value is broadcast. Without center/scale the keypoints are in crop pixels.
        Host-side (CPU / array) center, scale and rotation must be finite and scale positive
        (ValueError otherwise); tensors already on the device are not checked (no host sync).
        Returns {"keypoints": (N, K, 2) fp32, "scores": (N, K) fp32} on the engine's device,
        or on ``device`` (e.g. "cpu"): both in one device-to-host copy, never graph buffers.
        """
        img, c, s, r = self._prepare(crops, center, scale, rotation)
        if self.cuda_graph:
            kp, sc = self._replay(img, c, s, r, clone=device is None)
        else:
            kp, sc = self._run_step(img, c, s, r)
        if device is not None:
            kp, sc = _to_device_together(kp, sc, torch.device(device))
        return {"keypoints": kp, "scores": sc}

    def predict(self, crops, center=None, scale=None, rotation=None,
                device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Like ``__call__`` but returns one (N, K, 3) [x, y, score] tensor (on ``device`` if given)."""
        out = self(crops, center, scale, rotation, device=device)
        return torch.cat((out["keypoints"], out["scores"][..., None]), dim=-1)

    # ------------------------------------------------------------------ CUDA graphs

    def _run_step(self, img, c, s, r):
        pdl = contextlib.nullcontext() if self.pdl is None else dk.programmatic_launch(self.pdl)
        with dk.split_counters(self._split_counts), pdl:
            return self._step(img, c, s, r)

    def _replay(self, img, c, s, r, clone: bool = True):
        key = (tuple(img.shape), r is None)  # the input buffer has one dtype and layout (_input_spec)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(img, c, s, r)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        dsts = [d for d in static_in if d is not None]
        srcs = [t for d, t in zip(static_in, (img, c, s, r)) if d is not None]
        if _FOREACH_COPY is not None and all(t.device == d.device for t, d in zip(srcs, dsts)):
            _FOREACH_COPY(dsts, srcs, non_blocking=True)  # one launch for all inputs (same dtypes)
        else:
            for dst, src in zip(dsts, srcs):
                dst.copy_(src, non_blocking=True)
        graph.replay()
        if self.clone_outputs and clone:
            return tuple(o.clone() for o in static_out)
        return static_out

    def _capture(self, img, c, s, r):
        dtype, fmt = self._input_spec()
        static_img = torch.empty(img.shape, dtype=dtype, device=self.device, memory_format=fmt).copy_(img)
        static_in = (static_img, *(None if t is None else t.clone() for t in (c, s, r)))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, static_out = dk.capture_cuda_graph(lambda: self._run_step(*static_in), warmup=3, pool=self._pool,
                                                  device=self.device, pdl="auto" if self.pdl is None else None)
        return graph, static_in, static_out

    def reset_graphs(self) -> None:
        """Drop the captured graphs (e.g. to free their memory)."""
        self._graphs.clear()

    def __repr__(self) -> str:
        return (
            f"InferenceEngine({getattr(self.model, 'name', 'model')}, kind={self.kind}, device={self.device}, "
            f"precision={self.precision}, cast_model={self.cast_model}, flip_test={self.flip_test}, fold_bn={self.fold_bn}, "
            f"fuse_epilogues={self.fuse_epilogues}, fuse_pos_norm={self.fuse_pos_norm}, fuse_mlp={self.fuse_mlp}, "
            f"triton_linears={self.triton_linears}, fuse_add_norm={self.fuse_add_norm}, mlp_kernel={self.mlp_kernel}, "
            f"fuse_qkv={self.fuse_qkv}, pdl={self.pdl}, "
            f"compile={self.compiled}, cuda_graph={self.cuda_graph})"
        )

