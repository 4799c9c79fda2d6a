"""Task recipes: the plan's pure pieces against independent computations, then the defaults."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scvi import REGISTRY_KEYS
from sklearn.metrics import f1_score

from helpers import FAST, TINY, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.model import _model, _trainingplan
from scmamba2_scvi.model._trainingplan import (
    SCMamba2TrainingPlan,
    class_balance_weights,
    confusion_counts,
    fit_temperature,
    linear_ramp,
    macro_f1,
)
from scmamba2_scvi.module import SCMamba2Module

pytestmark = pytest.mark.usefixtures("quiet")  # warnings off (conftest)


# ---------------------------------------------------------------- pure functions
def test_linear_ramp():
    assert linear_ramp(0, 10) == 0.0
    assert linear_ramp(5, 10) == pytest.approx(0.5)
    assert linear_ramp(10, 10) == 1.0
    assert linear_ramp(50, 10) == 1.0
    assert linear_ramp(3, 0) == 1.0  # no ramp


def test_class_balance_weights_formula():
    labels = np.array([0, 0, 0, 0, 1, -1, -1] + [2] * 9)
    w = class_balance_weights(labels, 4).numpy()
    # independent: counts by np.unique, w_c = n_c^-1/2 normalised to mean 1 over present classes
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    raw = 1 / np.sqrt(counts)
    expected = np.ones(4)
    expected[classes] = raw / raw.mean()
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w[classes].mean() == pytest.approx(1.0)
    assert w[1] > w[0] > w[2]  # the rarest class weighs most
    np.testing.assert_array_equal(class_balance_weights(np.full(5, -1), 3).numpy(), np.ones(3))
    with pytest.raises(ValueError, match="n_labels"):
        class_balance_weights(np.array([0, 3]), 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_macro_f1_matches_sklearn(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 6, generator=gen)
    logits[:, 5] -= 10  # class 5 is never predicted
    labels = torch.randint(-1, 4, (300,), generator=gen)  # classes 4, 5 never true; -1 unknown
    known = labels >= 0
    expected = f1_score(labels[known], logits[known].argmax(-1), average="macro")
    assert macro_f1(confusion_counts(logits, labels, 6)) == pytest.approx(expected)
    assert macro_f1(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(true_t):
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20000, 5, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)
    # unlabelled cells (-1) do not count, however wrong their logits are
    junk = torch.cat([logits, 50 * torch.randn(500, 5, generator=gen)])
    junk_labels = torch.cat([labels, torch.full((500,), -1)])
    assert fit_temperature(junk, junk_labels) == pytest.approx(
        fit_temperature(logits, labels), rel=1e-6
    )
    assert fit_temperature(logits, torch.full((20000,), -1)) == 1.0


# ---------------------------------------------------------------- plan options
def _module(n_labels):
    return SCMamba2Module(
        20, n_batch=0, n_labels=n_labels, d_model=16, n_layers=1, d_state=8, head_dim=8
    )


def test_plan_options_default_by_classifier_and_errors():
    on = SCMamba2TrainingPlan(_module(3))
    assert on.class_balance and on.keep_best and on.calibrate
    off = SCMamba2TrainingPlan(_module(0))
    assert not (off.class_balance or off.keep_best or off.calibrate)
    assert not SCMamba2TrainingPlan(_module(3), keep_best=False).keep_best
    with pytest.raises(ValueError, match="labels_key"):
        SCMamba2TrainingPlan(_module(0), calibrate=True)
    with pytest.raises(ValueError, match="dar_warmup"):
        SCMamba2TrainingPlan(_module(3), dar_warmup=1.5)


def test_label_weights_weight_the_cross_entropy():
    module = _module(3)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 2, -1])
    w = torch.tensor([0.5, 2.0, 1.0])
    gen = {
        "gep": torch.zeros(6, 4),
        "gepc": torch.zeros(6, 4),
        "gepc_zero_logit": torch.zeros(6, 4),
        "label_logits": logits,
    }
    inf = {
        "targets": torch.zeros(6, 4),
        "masked": torch.ones(6, 4, dtype=torch.bool),
        "z": torch.zeros(6, 16),
        "batch_index": None,
        "key_padding_mask": None,
    }
    out = module.loss({REGISTRY_KEYS.LABELS_KEY: labels}, inf, gen, label_weights=w)
    logp = torch.log_softmax(logits[:5], -1)[torch.arange(5), labels[:5]]
    expected = -(w[labels[:5]] * logp).sum() / w[labels[:5]].sum()
    torch.testing.assert_close(out.extra_metrics["cls"], expected)


# ---------------------------------------------------------------- recipes on a tiny model
class _StateRecorder(Callback):
    """The module's weights at the end of every validation epoch."""

    def __init__(self):
        self.states = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append(
                {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
            )


def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a if k != "logit_temperature")


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_restores_best_validation_epoch(monkeypatch, keep_best):
    scores = iter([0.2, 0.9, 0.5, 0.3])
    monkeypatch.setattr(_trainingplan, "macro_f1", lambda confusion: next(scores))
    torch.manual_seed(0)
    adata = synthetic(n_cells=120)
    SCMamba2.setup_anndata(adata, labels_key="cell_type")
    model = SCMamba2(adata, **TINY)
    recorder = _StateRecorder()
    model.train(
        max_epochs=4,
        batch_size=32,
        callbacks=[recorder],
        plan_kwargs={"keep_best": keep_best, "calibrate": False},
        **FAST,
    )
    np.testing.assert_allclose(
        model.history["validation_macro_f1"].to_numpy(dtype=float).ravel(), [0.2, 0.9, 0.5, 0.3]
    )
    assert len(recorder.states) == 4
    assert not _state_equal(recorder.states[1], recorder.states[3])  # training moved them
    final = model.module.state_dict()
    assert _state_equal(final, recorder.states[1 if keep_best else 3])


def test_keep_best_without_validation_is_a_no_op():
    adata = synthetic(n_cells=60)
    SCMamba2.setup_anndata(adata, labels_key="cell_type")
    model = SCMamba2(adata, **TINY)
    model.train(max_epochs=1, batch_size=32, train_size=1.0, **FAST)
    assert float(model.module.logit_temperature) == 1.0
    assert "validation_macro_f1" not in model.history


@pytest.fixture(scope="module")
def annotated():
    torch.manual_seed(0)
    adata = synthetic(n_cells=150)
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = SCMamba2(adata, **TINY)
    model.train(max_epochs=3, batch_size=32, plan_kwargs={"lr": 3e-3}, **FAST)
    return adata, model


def test_recipes_on_with_both_keys(annotated):
    adata, model = annotated
    plan = model.trainer.lightning_module
    assert plan.class_balance and plan.keep_best and plan.calibrate
    assert plan.loss_kwargs["dar_weight"] == 1.0  # after the ramp
    assert plan.dar_weight == 1.0 and plan.loss_kwargs["ecs_weight"] > 0
    assert model.module.token_norm.n_domains == 2  # DSBN
    # the saved argument stays None, so a query model resolves it again (to the same heads)
    assert model.init_params_["non_kwargs"]["dsbn"] is None
    query = SCMamba2.load_query_data(adata.copy(), model)
    assert query.module.token_norm.n_domains == 2
    # class weights of the training cells' labels
    codes = adata.obs["cell_type"].cat.codes.to_numpy()[model.train_indices]
    torch.testing.assert_close(
        plan.loss_kwargs["label_weights"].cpu(), class_balance_weights(codes, 3)
    )
    assert model.history["dar_weight"].iloc[0, 0] < 1.0  # warm-up


def test_temperature_is_fitted_on_validation_logits(annotated):
    adata, model = annotated
    val = np.sort(model.validation_indices)
    z = torch.as_tensor(model.get_latent_representation(indices=val))
    with torch.inference_mode():
        logits = model.module.classifier(z.to(model.device)).cpu()
    labels = torch.as_tensor(adata.obs["cell_type"].cat.codes.to_numpy()[val])
    t = float(model.module.logit_temperature)
    assert t != 1.0
    assert t == pytest.approx(fit_temperature(logits, labels), rel=1e-3)


def test_predict_soft_is_softmax_over_temperature(annotated):
    _, model = annotated
    model.module.logit_temperature.fill_(2.0)
    try:
        soft = model.predict(soft=True)
        z = torch.as_tensor(model.get_latent_representation())
        with torch.inference_mode():
            logits = model.module.classifier(z.to(model.device)).cpu()
    finally:
        model.module.logit_temperature.fill_(1.0)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(soft.to_numpy(), torch.softmax(logits / 2.0, -1).numpy(), atol=1e-5)
    assert list(soft.columns) == model.label_categories


def test_recipes_off_without_keys_and_user_kwargs_win():
    adata = synthetic(n_cells=60)
    SCMamba2.setup_anndata(adata)
    model = SCMamba2(adata, **TINY)
    assert model.module.token_norm.n_domains == 1
    model.train(max_steps=1, batch_size=32, **FAST)
    plan = model.trainer.lightning_module
    assert not (plan.class_balance or plan.keep_best or plan.calibrate)
    assert "dar_weight" not in plan.loss_kwargs and "ecs_weight" not in plan.loss_kwargs

    adata = synthetic(n_cells=60)
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = SCMamba2(adata, dsbn=False, **TINY)
    assert model.module.token_norm.n_domains == 1
    model.train(
        max_steps=1,
        batch_size=32,
        plan_kwargs={
            "dar_weight": 0.0,
            "ecs_weight": 0.3,
            "class_balance": False,
            "keep_best": False,
        },
        **FAST,
    )
    plan = model.trainer.lightning_module
    assert plan.loss_kwargs["dar_weight"] == 0.0 and plan.loss_kwargs["ecs_weight"] == 0.3
    assert not plan.class_balance and not plan.keep_best and plan.calibrate
    assert "label_weights" not in plan.loss_kwargs

    # one batch registered: no integration recipe
    adata = synthetic(n_cells=60)
    adata.obs["batch"] = "a"
    SCMamba2.setup_anndata(adata, batch_key="batch")
    model = SCMamba2(adata, **TINY)
    assert model.module.token_norm.n_domains == 1
    model.train(max_steps=1, batch_size=32, **FAST)
    assert "dar_weight" not in model.trainer.lightning_module.loss_kwargs


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_default_epochs_budget_cell_passes(batch_key):
    """Without ``max_epochs``: 20,000 cell passes, five times that for integration."""
    adata = synthetic(n_cells=3000)
    SCMamba2.setup_anndata(adata, batch_key=batch_key)
    model = SCMamba2(adata, **TINY)
    model.train(max_steps=1, batch_size=32, **FAST)
    passes = 100_000 if batch_key else 20_000
    assert model.trainer.max_epochs == passes // 3000
    model.train(max_epochs=2, max_steps=1, batch_size=32, **FAST)
    assert model.trainer.max_epochs == 2


def test_default_epochs_clipped_to_5_and_50():
    assert _model._default_epochs(10**6, integration=True) == 5
    assert _model._default_epochs(100, integration=False) == 50
    assert _model._default_epochs(0, integration=False) == 50
