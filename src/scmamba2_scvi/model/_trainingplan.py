"""Lightning training plan: AdamW with linear warm-up and cosine decay, per step; task recipes."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan

from scmamba2_scvi.module._memory import batch_cells, guard_step, release_heap

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


def linear_ramp(step: int, ramp_steps: float) -> float:
    """Multiplier rising linearly from 0 at ``step`` 0 to 1 at ``ramp_steps``, then 1.

    Parameters
    ----------
    step
        Current optimizer step (0-based).
    ramp_steps
        Steps of the ramp; 0 or less: no ramp (always 1).

    Returns
    -------
    The multiplier, in ``[0, 1]``.
    """
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / ramp_steps))


def class_balance_weights(labels: torch.Tensor | np.ndarray, n_labels: int) -> torch.Tensor:
    """Per-class cross-entropy weights: inverse square root of each class's frequency.

    The square root balances rare classes (which decide macro-F1) without letting a handful of
    cells dominate the loss, as full inverse-frequency weights would.

    Parameters
    ----------
    labels
        Label codes of the training cells, ``0 .. n_labels - 1``; -1 (unlabelled) is ignored.
    n_labels
        Number of classes.

    Returns
    -------
    ``(n_labels,)`` float32 weights ``count ** -0.5``, normalised to mean 1 over the classes
    present; classes without any cell get 1 (they contribute no loss term anyway).

    Raises
    ------
    ValueError
        For a code at or above ``n_labels``.
    """
    labels = torch.as_tensor(np.asarray(labels)).reshape(-1).long()
    labels = labels[labels >= 0]
    if labels.numel() and int(labels.max()) >= n_labels:
        raise ValueError(f"Label code {int(labels.max())} is not below n_labels={n_labels}.")
    counts = torch.bincount(labels, minlength=n_labels).double()
    weights = torch.ones(n_labels, dtype=torch.float64)
    present = counts > 0
    if bool(present.any()):
        raw = counts[present].rsqrt()
        weights[present] = raw / raw.mean()
    return weights.float()


def confusion_counts(logits: torch.Tensor, labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``(n_labels, n_labels)`` counts of (true, predicted) classes; -1 labels are ignored."""
    labels = labels.reshape(-1).long()
    known = labels >= 0
    pred = logits[known].argmax(-1).long()
    flat = labels[known] * n_labels + pred
    return torch.bincount(flat, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-averaged F1 of a confusion matrix (rows true, columns predicted classes).

    Averaged over the classes that are true or predicted at least once, as
    :func:`sklearn.metrics.f1_score` with ``average="macro"``; 0 for an empty matrix.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    true, pred = confusion.sum(1), confusion.sum(0)
    seen = (true + pred) > 0
    if not bool(seen.any()):
        return 0.0
    f1 = 2 * tp[seen] / (true[seen] + pred[seen])
    return float(f1.mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Temperature scaling (Guo et al., 2017): one scalar, fitted on held-out cells, calibrates the
    probabilities without changing the predicted class. Optimised over ``log T`` (so ``T > 0``)
    with L-BFGS.

    Parameters
    ----------
    logits
        ``(n, n_labels)`` classifier logits of held-out cells.
    labels
        ``(n,)`` their label codes; -1 (unlabelled) is ignored.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    ``T`` (1.0 when no cell is labelled).
    """
    labels = torch.as_tensor(labels).reshape(-1).long()
    known = labels >= 0
    if not bool(known.any()):
        return 1.0
    # a copy outside inference mode: Lightning collects validation logits under it
    x = torch.as_tensor(logits).detach().to(torch.float64)[known].clone()
    y = labels[known].clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


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
    ``D``), as mamba-ssm does. Keyword arguments not listed here go to
    :meth:`~scmamba2_scvi.module.SCMamba2Module.loss` (``gep_weight``, ``gepc_weight``,
    ``cls_weight``, ``dar_weight``, ``ecs_weight``, ``ecs_threshold``, ``label_weights``, ...);
    any other name raises a ``TypeError``.

    With a classifier, the annotation recipe is on by default: class-balanced cross-entropy,
    the weights of the epoch with the best validation macro-F1 (logged as
    ``validation_macro_f1``, on the validation cells' unmasked values, as :meth:`predict` sees
    them), and a temperature fitted on the validation cells for calibrated probabilities.

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
    class_balance
        Weight the classifier's cross-entropy per class by :func:`class_balance_weights` of the
        training cells' labels (passed to the loss as ``label_weights``; a ``label_weights``
        given here wins). ``None``: on when the module has a classifier.
    keep_best
        Keep a copy of the weights at the validation epoch with the best macro-F1 (the last
        one on ties) and restore it when training ends. Without validation cells nothing is
        kept and the last weights stay. ``None``: on when the module has a classifier.
    calibrate
        When training ends, fit the classifier's temperature on the validation cells' logits
        (:func:`fit_temperature`; those of the kept epoch with ``keep_best``) and store it in
        the module's ``logit_temperature``, which ``predict(soft=True)`` divides the logits by.
        Without validation cells the temperature is left as it is. ``None``: on when the module
        has a classifier.
    dar_warmup
        Fraction of all training steps over which ``dar_weight`` rises linearly from 0
        (:func:`linear_ramp`), so the embedding forms before it is pushed to mix batches;
        0: the full weight from the first step.
    **loss_kwargs
        Loss arguments, see above.
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
        class_balance: bool | None = None,
        keep_best: bool | None = None,
        calibrate: bool | None = None,
        dar_warmup: float = 0.2,
        **loss_kwargs,
    ):
        loss_names = [
            name
            for name, p in inspect.signature(module.loss).parameters.items()
            if p.default is not inspect.Parameter.empty
        ]
        own = [p for p in inspect.signature(type(self).__init__).parameters][2:-1]
        check_keywords("SCMamba2TrainingPlan (plan_kwargs)", loss_kwargs, own + loss_names)
        has_classifier = getattr(module, "classifier", None) is not None
        for name, value in (
            ("class_balance", class_balance),
            ("keep_best", keep_best),
            ("calibrate", calibrate),
        ):
            if value and not has_classifier:
                raise ValueError(
                    f"{name}=True needs a classifier: register labels with "
                    "SCMamba2.setup_anndata(..., labels_key=...) before creating the model, or "
                    f"leave {name} at None."
                )
        if not 0.0 <= dar_warmup <= 1.0:
            raise ValueError(f"dar_warmup is a fraction of training in [0, 1]; got {dar_warmup}.")
        super().__init__(module, optimizer="AdamW", lr=lr, weight_decay=weight_decay, **loss_kwargs)
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, betas
        self.memory_budget = memory_budget
        self.class_balance = has_classifier if class_balance is None else bool(class_balance)
        self.keep_best = has_classifier if keep_best is None else bool(keep_best)
        self.calibrate = has_classifier if calibrate is None else bool(calibrate)
        self.dar_warmup = dar_warmup
        self.dar_weight = self.loss_kwargs.get("dar_weight")
        #: best validation macro-F1 so far (``keep_best``), ``None`` before the first one
        self.best_macro_f1: float | None = None
        self._val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_val: tuple[torch.Tensor, torch.Tensor] | None = None
        #: cells of the latest training or validation minibatch (``None`` before the first)
        self._minibatch_cells: int | None = None

    def log(self, *args, **kwargs):
        """Lightning's ``log``, with the minibatch's number of cells as its batch size.

        Lightning would otherwise guess the batch size from the first tensor it finds: 1 for a
        packed minibatch (one row holding every cell), with a warning, and epoch means weighted
        by that guess.
        """
        if kwargs.get("batch_size") is None and self._minibatch_cells is not None:
            kwargs["batch_size"] = self._minibatch_cells
        return super().log(*args, **kwargs)

    def _training_labels(self) -> np.ndarray | None:
        """Label codes of the training cells (heads' indices, -1 unknown) from the data splitter.

        ``None`` when the data module does not say which cells train (not scvi-tools'
        :class:`~scvi.dataloaders.DataSplitter`) or no label column is registered.
        """
        splitter = getattr(self.trainer, "datamodule", None)
        manager = getattr(splitter, "adata_manager", None)
        train_idx = getattr(splitter, "train_idx", None)
        if manager is None or train_idx is None:
            return None
        if manager.registry.get("setup_args", {}).get("labels_key", True) is None:
            return None
        codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).reshape(-1)
        codes = codes[np.asarray(train_idx, dtype=np.int64)]
        # codes past the classifier's (unlabelled, or a query's new categories) are unknown
        return np.where(codes < self.module.n_labels, codes, -1)

    def on_fit_start(self):
        """Class weights of the training cells' labels (``class_balance``)."""
        if not self.class_balance or "label_weights" in self.loss_kwargs:
            return
        labels = self._training_labels()
        if labels is None:
            warnings.warn(
                "class_balance: the data module does not say which cells train, so the "
                "classifier's loss is not class-balanced. Pass label_weights in plan_kwargs "
                "(scmamba2_scvi.model.class_balance_weights), or class_balance=False.",
                UserWarning,
                stacklevel=2,
            )
            return
        weights = class_balance_weights(labels, self.module.n_labels)
        self.loss_kwargs["label_weights"] = weights.to(self.device)

    def training_step(self, batch, batch_idx):
        """scvi-tools' step, after the memory guard has planned the batch and DAR's ramp."""
        guard_step(self.module, batch, self.memory_budget)
        self._minibatch_cells = batch_cells(batch)
        if self.dar_weight and self.dar_warmup > 0:
            total = self.trainer.estimated_stepping_batches
            ramp_steps = self.dar_warmup * total if math.isfinite(total) else 0.0
            weight = self.dar_weight * linear_ramp(self.global_step, ramp_steps)
            self.loss_kwargs["dar_weight"] = weight
            self.log("dar_weight", weight, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def on_validation_epoch_start(self):
        """Start collecting the validation cells' logits; return the training steps' freed heap."""
        self._val_batches = []
        release_heap(self.module)

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation losses; with a classifier, also the cells' logits.

        The losses see masked values (the GEP objective); the logits are computed again from
        all values, as :meth:`~scmamba2_scvi.model.SCMamba2.predict` computes them, so that
        the kept epoch and the temperature fit what prediction will see.
        """
        self._minibatch_cells = batch_cells(batch)
        super().validation_step(batch, batch_idx)
        labels = batch.get(REGISTRY_KEYS.LABELS_KEY)
        if getattr(self.module, "classifier", None) is None or labels is None:
            return
        unmasked = {**batch, "input_values": batch["values"]}
        z = self.module.inference(**self.module._get_inference_input(unmasked))["z"]
        logits = self.module.classifier(z).float().cpu()
        self._val_batches.append((logits, labels.reshape(-1).long().cpu()))

    def on_validation_epoch_end(self):
        """Log ``validation_macro_f1``; keep the weights of the best epoch (``keep_best``).

        With several processes the confusion counts are summed over them, so that every
        process keeps the same epoch.
        """
        batches, self._val_batches = self._val_batches, []
        if self.trainer.sanity_checking or getattr(self.module, "classifier", None) is None:
            return
        n = self.module.n_labels
        if batches:
            logits = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])
            confusion = confusion_counts(logits, labels, n)
        else:
            logits, labels, confusion = None, None, torch.zeros(n, n, dtype=torch.long)
        if self.trainer.world_size > 1:
            confusion = self.trainer.strategy.reduce(
                confusion.to(self.device), reduce_op="sum"
            ).cpu()
        if int(confusion.sum()) == 0:
            return
        score = macro_f1(confusion)
        self.log("validation_macro_f1", score, on_step=False, on_epoch=True)
        self._last_val = (logits, labels)
        if self.keep_best and (self.best_macro_f1 is None or score >= self.best_macro_f1):
            self.best_macro_f1 = score
            self._best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()
            }
            self._best_val = (logits, labels)

    def on_train_end(self):
        """Restore the best epoch's weights (``keep_best``), then fit the temperature."""
        if self.keep_best and self._best_state is not None:
            self.module.load_state_dict(self._best_state)
            self._best_state = None
        val = self._best_val if self.keep_best and self._best_val is not None else self._last_val
        if not self.calibrate or val is None or not hasattr(self.module, "logit_temperature"):
            return
        t = fit_temperature(*val) if val[0] is not None else 1.0
        if self.trainer.world_size > 1:  # one temperature: the first process's
            t = self.trainer.strategy.broadcast(t, src=0)
        self.module.logit_temperature.fill_(t)

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
