"""distilpose_kernels: fused ops for pose estimation (token attention, simulated heatmaps, decoding,
convolution epilogues).

Importing this package never imports Triton, never queries a GPU and never loads the
compiled extension: every public op is resolved lazily on first attribute access.
It does not depend on the `distilpose` model package.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "token_attention": "attention",
    "token_attention_reference": "attention",
    "qkv_attention": "attention",
    "qkv_attention_reference": "attention",
    "TokenAttention": "attention",
    "add_pos_layernorm": "attention",
    "add_pos_layernorm_reference": "attention",
    "simulated_heatmap_loss": "heatmap",
    "simulated_heatmap_loss_reference": "heatmap",
    "reg2hm_loss_reference": "heatmap",
    "score_loss_reference": "heatmap",
    "joint_mse_loss": "heatmap",
    "render_gaussian_heatmaps": "heatmap",
    "gaussian_heatmap_targets": "heatmap",
    "gaussian_heatmap_targets_reference": "heatmap",
    "GaussianHeatmapTargets": "heatmap",
    "render_gaussian_heatmaps_reference": "heatmap",
    "GaussianHeatmapRenderer": "heatmap",
    "simulated_gaussians_reference": "heatmap",
    "teacher_value_at_prediction": "heatmap",
    "SimulatedHeatmapLoss": "heatmap",
    "soft_argmax": "decode",
    "soft_argmax_reference": "decode",
    "decode_heatmaps": "decode",
    "decode_heatmaps_reference": "decode",
    "flip_heatmaps": "decode",
    "SoftArgmax": "decode",
    "linear_gelu": "mlp",
    "linear_gelu_reference": "mlp",
    "linear": "mlp",
    "linear_reference": "mlp",
    "fused_mlp": "mlp",
    "fused_mlp_reference": "mlp",
    "fused_mlp_add_norm": "mlp",
    "fused_mlp_add_norm_reference": "mlp",
    "linear_add_norm": "mlp",
    "linear_add_norm_reference": "mlp",
    "fp32_dot_precision": "_utils",
    "auto_choices": "_utils",
    "tuned_configs": "_utils",
    "timing_for_cuda_graphs": "_utils",
    "timed_choice": "_utils",
    "agrees_at_dtype": "_utils",
    "capture_cuda_graph": "_utils",
    "split_counters": "_utils",
    "programmatic_launch": "_utils",
    "pdl_supported": "_utils",
    "PDL_ENV": "_utils",
    "FP32_DOT_ENV": "_utils",
    "upsample_sum": "multiscale",
    "upsample_sum_reference": "multiscale",
    "conv2d_relu": "conv_epilogue",
    "conv2d_relu_reference": "conv_epilogue",
    "ConvReLU2d": "conv_epilogue",
    "regression_to_image": "keypoints",
    "regression_head": "heads",
    "regression_head_reference": "heads",
    "regression_to_image_reference": "keypoints",
    "info": "info",
    "annotate": "_utils",
    "force_reference": "_utils",
    "FORCE_REFERENCE_ENV": "_utils",
    "NVTX_ENV": "_utils",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'distilpose_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
