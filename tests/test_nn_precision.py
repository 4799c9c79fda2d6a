"""bf16 autocast of the encoder: the decision, and its closeness to float32."""

import pytest
import torch

from scmamba2_scvi.nn import BiMamba2Encoder, bf16_pays, resolve_precision

# Stated tolerance of the bf16 path: relative error of embeddings and of the loss.
EMBEDDING_RTOL, LOSS_RTOL = 3e-2, 2e-2


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    auto = torch.bfloat16 if bf16_pays("cpu") else torch.float32
    assert resolve_precision("auto", cpu) == auto
    assert not bf16_pays("mps")
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'bf16'"):
        resolve_precision("fp16", cpu)


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
