"""Lightning training plan: AdamW with linear warm-up and cosine decay, per step."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan

from scmamba2_scvi.module._memory import guard_step

from ._utils import check_keywords


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay.

    Parameters
    ----------
    step
        Current optimizer step (0-based).
    warmup
        Warm-up steps.
    total
        Total steps of the run.
    min_ratio
        Final multiplier.

    Returns
    -------
    The multiplier of the base learning rate.
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases, norms, embeddings and SSM parameters.

    Parameters
    ----------
    module
        The network.
    weight_decay
        Decay of the other (matrix) parameters.

    Returns
    -------
    Two groups, with and without decay.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.dim() < 2
            or getattr(p, "_no_weight_decay", False)
            or "embedding" in name
            or "norm" in name
        )
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw_warmup_cosine(
    module: torch.nn.Module,
    total_steps: int | float,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    warmup_ratio: float = 0.05,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.05,
) -> dict[str, Any]:
    """The optimizer of fine-tuning and pretraining: AdamW, warm-up then cosine, per step.

    Used by :class:`SCMamba2TrainingPlan` and :class:`~scmamba2_scvi.model.PretrainPlan` in
    their ``configure_optimizers``.

    Parameters
    ----------
    module
        The network (groups from :func:`param_groups`).
    total_steps
        Optimizer steps of the run (Lightning's ``trainer.estimated_stepping_batches``).
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay of the matrix parameters.
    betas
        AdamW betas.
    warmup_ratio
        Fraction of the steps spent warming up (ignored when ``warmup_steps`` is given).
    warmup_steps
        Warm-up steps.
    min_lr_ratio
        Learning rate at the end of the cosine, as a fraction of ``lr``.

    Returns
    -------
    Lightning's optimizer configuration: the optimizer and its per-step scheduler.
    """
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=betas)
    total = max(1, int(total_steps))
    warmup = warmup_steps if warmup_steps is not None else int(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SCMamba2TrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` with AdamW, warm-up + cosine schedule.

    Weight decay skips biases, norms, embeddings and the SSM parameters (``A_log``, ``dt_bias``,
    ``D``), as mamba-ssm does. Keyword arguments not listed here are loss weights passed to
    :meth:`~scmamba2_scvi.module.SCMamba2Module.loss` (``gep_weight``, ``gepc_weight``,
    ``cls_weight``, ``dar_weight``, ``ecs_weight``, ``ecs_threshold``); any other name raises a
    ``TypeError``.

    Parameters
    ----------
    module
        The :class:`~scmamba2_scvi.module.SCMamba2Module`.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay.
    warmup_ratio
        Fraction of all steps spent warming up (ignored when ``warmup_steps`` is given).
    warmup_steps
        Warm-up steps.
    min_lr_ratio
        Learning rate at the end of the cosine, as a fraction of ``lr``.
    betas
        AdamW betas.
    memory_budget
        Bytes a training step may use (default: the memory available when the step starts).
        Before each step, a batch predicted not to fit is encoded in groups of cells recomputed
        in the backward pass (same result); a batch where even one cell cannot fit raises a
        :class:`MemoryError` naming the fix.
    **loss_kwargs
        Loss weights, see above.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        memory_budget: float | None = None,
        **loss_kwargs,
    ):
        loss_names = [
            name
            for name, p in inspect.signature(module.loss).parameters.items()
            if p.default is not inspect.Parameter.empty
        ]
        own = [p for p in inspect.signature(type(self).__init__).parameters][2:-1]
        check_keywords("SCMamba2TrainingPlan (plan_kwargs)", loss_kwargs, own + loss_names)
        super().__init__(module, optimizer="AdamW", lr=lr, weight_decay=weight_decay, **loss_kwargs)
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, betas
        self.memory_budget = memory_budget

    def training_step(self, batch, batch_idx):
        """scvi-tools' step, after the memory guard has planned the batch."""
        guard_step(self.module, batch, self.memory_budget)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        """AdamW and a per-step warm-up + cosine schedule (:func:`adamw_warmup_cosine`)."""
        return adamw_warmup_cosine(
            self.module,
            self.trainer.estimated_stepping_batches,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            warmup_ratio=self.warmup_ratio,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )
