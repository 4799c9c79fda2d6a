"""scvi-tools model: AnnData in and out, training, save/load, transfer learning."""

from ._model import PRESETS, SCMamba2
from ._trainingplan import SCMamba2TrainingPlan, warmup_cosine

__all__ = ["PRESETS", "SCMamba2", "SCMamba2TrainingPlan", "warmup_cosine"]
