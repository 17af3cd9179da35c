"""Models: backbones, Token-distilling Encoder, heads, presets, distiller."""
from .heads import HeatmapHead, RegressionHead
from .pose import TokenPoseModel
from .presets import PRESETS, build_model, count_parameters
from .tde import TokenDistillingEncoder, sine_position_table

__all__ = [
    "HeatmapHead",
    "PRESETS",
    "RegressionHead",
    "TokenDistillingEncoder",
    "TokenPoseModel",
    "build_model",
    "count_parameters",
    "sine_position_table",
]
