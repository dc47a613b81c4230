"""Training ParScale models: ``TrainConfig`` (every setting, validated), ``train`` (the loop:
from scratch, two-stage, recycling, frozen backbone, exact resume, DDP) and ``TrainResult``.

Importing this package does not import torch; ``train`` does.
"""

from .options import TrainConfig, load_config_file
from .trainer import TrainResult, format_summary, lr_at, plan_stages, train

__all__ = ["TrainConfig", "TrainResult", "format_summary", "load_config_file", "lr_at", "plan_stages", "train"]
