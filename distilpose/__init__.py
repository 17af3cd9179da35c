"""DistilPose: tokenized pose regression with heatmap distillation."""
__version__ = "0.1.0"
