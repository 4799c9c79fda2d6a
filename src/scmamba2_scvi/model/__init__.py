"""scvi-tools model: AnnData in and out, training, save/load, transfer learning, pretraining."""

from ._checksum import verify_weights, write_checksum
from ._model import PRESETS, SCMamba2, build_module
from ._pretrain import PretrainPlan, corpus_vocab, latest_checkpoint, pretrain
from ._pretrained import save_pretrained
from ._trainingplan import (
    SCMamba2TrainingPlan,
    adamw_warmup_cosine,
    class_balance_weights,
    fit_temperature,
    linear_ramp,
    param_groups,
    warmup_cosine,
)

__all__ = [
    "PRESETS",
    "PretrainPlan",
    "SCMamba2",
    "SCMamba2TrainingPlan",
    "adamw_warmup_cosine",
    "build_module",
    "class_balance_weights",
    "corpus_vocab",
    "fit_temperature",
    "latest_checkpoint",
    "linear_ramp",
    "param_groups",
    "pretrain",
    "save_pretrained",
    "verify_weights",
    "warmup_cosine",
    "write_checksum",
]
