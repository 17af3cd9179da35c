"""Training: configs and presets, the shared loop (teacher / distillation, AMP, DDP, exact resume), CLIs."""
from ..checkpoint import build_model_from_meta, model_from_checkpoint
from .config import PRESETS, TrainConfig, apply_overrides, get_preset, resolve_config, save_config
from .optim import build_optimizer, build_scheduler
from .trainer import Trainer

__all__ = [
    "PRESETS",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "build_model_from_meta",
    "build_optimizer",
    "build_scheduler",
    "get_preset",
    "model_from_checkpoint",
    "resolve_config",
    "save_config",
]
