"""bf16 autocast of the encoder: the decision, and its closeness to float32."""

import pytest
import torch

from scmamba2_scvi.module import SCMamba2Module
from scmamba2_scvi.nn import BF16_MIN_WIDTH, BiMamba2Encoder, _precision

# Stated tolerance of the bf16 path: relative error of embeddings and of the loss.
EMBEDDING_RTOL, LOSS_RTOL = 3e-2, 2e-2


def test_compute_dtype_resolves_auto_by_width_and_hardware(monkeypatch):
    cpu = torch.device("cpu")
    narrow, wide = BiMamba2Encoder(32, 1, d_state=8, head_dim=8), BiMamba2Encoder(256, 1)
    assert narrow.compute_dtype(cpu) == torch.float32  # the building block's default: fp32
    narrow.precision = "bf16"
    assert narrow.compute_dtype(cpu) == torch.bfloat16
    narrow.precision = wide.precision = "auto"
    monkeypatch.setattr(_precision, "cpu_has_native_bf16", lambda: True)
    assert BF16_MIN_WIDTH > 32 and wide.d_model >= BF16_MIN_WIDTH
    assert wide.compute_dtype(cpu) == torch.bfloat16
    assert narrow.compute_dtype(cpu) == torch.float32
    for device in ("cuda", "meta"):  # on a GPU the caller's precision decides
        assert wide.compute_dtype(torch.device(device)) == torch.float32
    monkeypatch.setattr(_precision, "cpu_has_native_bf16", lambda: False)
    assert wide.compute_dtype(cpu) == torch.float32  # emulated bf16 is never chosen
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'bf16'"):
        BiMamba2Encoder(32, 1, precision="fp16")
    module = SCMamba2Module(10, d_model=16, n_layers=1, d_state=8, head_dim=8)
    assert module.encoder.precision == "auto"  # the model's default


def test_auto_runs_the_wide_encoder_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(_precision, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    enc = BiMamba2Encoder(256, 1, d_state=16, head_dim=64)
    x = torch.randn(1, 40, 256)
    out = {}
    for precision in ("fp32", "bf16", "auto"):
        enc.precision = precision
        out[precision] = enc(x)
    assert torch.equal(out["auto"], out["bf16"]) and not torch.equal(out["auto"], out["fp32"])


def test_bf16_embeddings_and_loss_within_tolerance_of_fp32():
    torch.manual_seed(0)
    enc = BiMamba2Encoder(64, 2, d_state=16, head_dim=16, chunk_size=16, tokens_per_block=64)
    readout = torch.nn.Linear(64, 1)
    x = torch.randn(3, 150, 64)
    pad = torch.arange(150)[None] >= torch.tensor([150, 90, 41])[:, None]
    target = torch.randn(3, 150)

    def run(precision):
        enc.precision = precision
        enc.zero_grad()
        tokens = enc(x, key_padding_mask=pad)
        emb = tokens.masked_fill(pad[..., None], 0).sum(1) / (~pad).sum(1, keepdim=True)
        loss = (readout(tokens)[..., 0] - target)[~pad].pow(2).mean()
        loss.backward()
        return tokens.dtype, emb.detach(), loss.detach(), enc.layers[0].mixer.in_proj.weight.grad

    dtype32, emb32, loss32, grad32 = run("fp32")
    dtype16, emb16, loss16, grad16 = run("bf16")
    assert dtype32 == dtype16 == torch.float32  # the encoder's output stays float32
    rel = (emb16 - emb32).norm() / emb32.norm()
    assert 0 < rel < EMBEDDING_RTOL, rel  # > 0: bf16 did run
    assert abs(loss16 - loss32) / loss32 < LOSS_RTOL
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), 0) > 0.99
