"""Training memory guard: estimate a step's peak before running it, split the encoder if needed.

A training step keeps, until its backward pass, what autograd saved for every token of the
batch; that grows with ``cells x tokens``, the rest (parameters, optimizer state) does not. The
guard measures the saved bytes per token once on a one-cell probe of the model, predicts the
step's peak for the batch at hand, and when it exceeds the memory available makes the encoder
run the batch in groups of cells, each recomputed in the backward pass. That is the same
computation (cells are independent in the encoder; batch statistics outside it are unchanged),
so losses and gradients equal the unsplit step's. A real gradient-accumulation split of the
whole batch would change the token BatchNorm's statistics and the mask draw.

The other way round, a small step keeps the mixers' intermediates instead of recomputing them
(the encoder's ``keep_activations``): the same gradients, one forward pass fewer.

On CPU the guard also hands the memory that earlier steps freed back to the operating system
(:func:`keep_heap`; the embedding does the same after each batch): glibc keeps freed tensors in
its heap, and as batch shapes vary it cannot reuse all of it, so without that the resident set
creeps up step after step.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Peak over what the saved tensors alone predict: gradients of the activations, the transient
# intermediates of the layer being recomputed, allocator slack. Checked by the training benchmark.
_SAFETY = 2.0
# Keeping the mixers' intermediates costs several times the memory of recomputing them and saves
# one forward pass, which pays only while a step is small: its intermediates then stay in cache
# (timed in benchmarks/train_efficiency.py; no gain over whole pbmc3k steps). So it is chosen
# only for steps under a small cap and far below the memory available.
_KEEP_FRACTION = 0.25
_KEEP_CAP = 2**30
# Freed heap tolerated before it is returned, in predicted step peaks: each return costs the
# following steps page faults, and two steps of slack cost less than half what one did
# (benchmarks/results/defaults_memory_pbmc3k.md). Never less than _HEAP_SLACK_MIN: small steps
# (the demo's) regrow a few of their peaks every step, and returning that much before each of
# them cost more time than it saved memory (benchmarks/results/heap_slack_demo.md).
_HEAP_SLACK_STEPS = 2
_HEAP_SLACK_MIN = 2**29


def available_bytes(device: torch.device) -> int:
    """Memory a step may still use: free GPU memory, or the kernel's ``MemAvailable`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):  # not Linux: no estimate, no guard
        return 2**62


def resident_bytes() -> int | None:
    """The process's resident set, from ``/proc/self/statm``; ``None`` where there is none."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _malloc_trim():
    """The C library's ``malloc_trim`` (glibc); ``None`` where it has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_heap(floor: int | None, slack: float) -> int | None:
    """Give the C heap's free pages back to the OS once the process grew ``slack`` past ``floor``.

    Returning them costs the next step the page faults of touching that memory again, so they
    are returned only once they amount to ``slack`` bytes (see :func:`keep_heap`): the resident
    set stays within a few steps of its floor.

    Parameters
    ----------
    floor
        Resident bytes after the last return; ``None``: return now.
    slack
        Growth past ``floor`` that is tolerated.

    Returns
    -------
    The new floor: resident bytes after this return, else ``floor``. Without ``/proc`` or
    ``malloc_trim`` (anything but Linux with glibc) nothing is returned and ``floor`` stays.
    """
    rss, trim = resident_bytes(), _malloc_trim()
    if rss is None or trim is None or (floor is not None and rss <= floor + slack):
        return floor
    trim(0)
    return resident_bytes()


def keep_heap(module, slack: float) -> None:
    """Return freed heap once the process grew ``slack`` past ``module``'s floor; new floor.

    ``slack`` is raised to at least 512 MiB: below that, returning costs more time in page
    faults than it saves memory. Called before each training step (by :func:`guard_step`) and
    after each embedding batch, where varying batch shapes grow the heap. Only for a module on
    CPU: on a GPU the batches' tensors are not in the host heap.
    """
    if next(module.parameters()).device.type != "cpu":
        return
    floor = getattr(module, "_heap_floor", None)
    module._heap_floor = return_freed_heap(floor, max(slack, _HEAP_SLACK_MIN))


def release_heap(module) -> None:
    """Return all freed heap now and make the result the floor of ``module``'s next step.

    Before work of another shape than the training steps' (validation, embedding), which would
    otherwise grow on the holes those steps left.
    """
    module._heap_floor = return_freed_heap(None, slack=0)


@dataclass(frozen=True)
class StepMemory:
    """Bytes that autograd saves per token slot of a batch, inside and outside the encoder.

    ``encoder_input`` is what a recomputed encoder group still keeps per token (its input);
    ``encoder_kept`` what the encoder saves when its mixers keep their intermediates.
    """

    encoder: float
    rest: float
    encoder_input: float
    encoder_kept: float

    def peak(
        self, n_cells: int, seqlen: int, group: int | None = None, *, kept: bool = False
    ) -> float:
        """Predicted peak bytes of a training step.

        ``group``: cells per recomputed group; ``kept``: the mixers keep their intermediates.
        """
        tokens = n_cells * seqlen
        if kept:
            return _SAFETY * tokens * (self.encoder_kept + self.rest)
        if group is None:
            return _SAFETY * tokens * (self.encoder + self.rest)
        # the encoder keeps each group's input; one group's activations live during its backward
        kept = tokens * (self.rest + self.encoder_input)
        return _SAFETY * (kept + group * seqlen * self.encoder)


def measure_step_memory(module, tokens: dict[str, torch.Tensor]) -> StepMemory:
    """Saved bytes per token slot of one forward + loss on a tokenized probe.

    Measured twice: with the mixers recomputing their intermediates and keeping them. Leaves
    the module as it was: random state and BatchNorm statistics are restored.

    Parameters
    ----------
    module
        The :class:`~scmamba2_scvi.module.SCMamba2Module`.
    tokens
        A small tokenized batch (the ``token_loss`` dict, masked).

    Returns
    -------
    The bytes per token slot saved for the backward pass.
    """
    keep = module.encoder.keep_activations
    try:
        module.encoder.keep_activations = False
        encoder, rest = _saved_bytes(module, tokens)
        module.encoder.keep_activations = True
        encoder_kept, _ = _saved_bytes(module, tokens)
    finally:
        module.encoder.keep_activations = keep
    n = tokens["genes"].numel()
    return StepMemory(
        encoder=encoder / n,
        rest=rest / n,
        encoder_input=4.0 * module.d_model,
        encoder_kept=encoder_kept / n,
    )


def _saved_bytes(module, tokens: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes autograd saves in one forward + loss, inside the encoder and outside it."""
    seen: dict[int, int] = {}
    in_encoder: set[int] = set()
    inside = [False]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        seen[key] = t.untyped_storage().nbytes()
        if inside[0]:
            in_encoder.add(key)
        return t

    hooks = [
        module.encoder.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        module.encoder.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
    ]
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    device = next(module.parameters()).device
    # the probe's mask draws must not move the generator a resumed run replays
    devices = [device] if device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            module.token_loss(tokens)
    finally:
        for hook in hooks:
            hook.remove()
        module.load_state_dict(buffers, strict=False)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    enc = sum(v for k, v in seen.items() if k in in_encoder and k not in params)
    rest = sum(v for k, v in seen.items() if k not in in_encoder and k not in params)
    return enc, rest


def plan_groups(memory: StepMemory, n_cells: int, seqlen: int, budget: float) -> int | None:
    """Cells per recomputed encoder group so that the step fits ``budget`` bytes.

    Returns ``None`` when the whole batch fits as it is.

    Raises
    ------
    MemoryError
        When even one cell per group does not fit, with the fix (a smaller ``max_len`` or preset).
    """
    if memory.peak(n_cells, seqlen) <= budget:
        return None
    groups = sorted({-(-n_cells // 2**k) for k in range(1, n_cells.bit_length() + 1)}, reverse=True)
    for group in groups:
        if memory.peak(n_cells, seqlen, group) <= budget:
            return group
    need = memory.peak(n_cells, seqlen, 1) / 2**30
    raise MemoryError(
        f"A training step on {n_cells} cells of {seqlen} tokens needs about {need:.1f} GB, more "
        f"than the {budget / 2**30:.1f} GB available, even one cell at a time in the encoder. "
        "Use a smaller `max_len` in setup_anndata, fewer cells per batch (`batch_size`), or a "
        "smaller `preset` (e.g. 'cpu-small')."
    )


def _first_cell(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first cell of a padded or packed token dict, as a padded one-cell dict."""
    if tokens.get("seq_idx") is not None:
        n = int(tokens["cu_seqlens"][1])
    else:
        n = int((~tokens["key_padding_mask"][0]).sum())
    per_token = tokens["genes"].shape
    return {
        k: v[:1, :n] if v.shape == per_token else v[:1]
        for k, v in tokens.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in ("seq_idx", "cu_seqlens")
    }


def batch_cells(tokens: dict[str, torch.Tensor]) -> int:
    """Cells of a padded (one per row) or packed (``len(cu_seqlens) - 1``) token dict."""
    cu = tokens.get("cu_seqlens")
    return tokens["genes"].shape[0] if cu is None else cu.numel() - 1


def batch_shape(tokens: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Cells and longest sequence of a padded or packed token dict."""
    cu = tokens.get("cu_seqlens")
    longest = tokens["genes"].shape[1] if cu is None else int(torch.diff(cu).max())
    return batch_cells(tokens), longest


def keeps_activations(memory: StepMemory, n_cells: int, seqlen: int, budget: float) -> bool:
    """Whether a step keeps the mixers' intermediates: a small step, a quarter of ``budget``."""
    return memory.peak(n_cells, seqlen, kept=True) <= min(_KEEP_FRACTION * budget, _KEEP_CAP)


def guard_step(module, tokens: dict[str, torch.Tensor], budget: float | None = None) -> int | None:
    """Before a training step on ``tokens``: plan how the encoder keeps what backward needs.

    Measures the bytes per token once per module (on the batch's first cell) and predicts the
    peak of a step on the batch (packed batches are counted as if padded to their longest
    cell, an upper bound); on CPU, first returns freed heap memory to the OS
    (:func:`keep_heap`, with two steps' predicted peak as slack). A small step keeps the
    mixers' intermediates (``module.encoder.keep_activations``, see :func:`keeps_activations`);
    otherwise they are recomputed in the backward pass, and a batch that would not fit even so
    is split into groups of cells (``module.encoder.checkpoint_cells``, ``None`` when the batch
    fits).

    Parameters
    ----------
    module
        The :class:`~scmamba2_scvi.module.SCMamba2Module`.
    tokens
        The batch's token dict (:class:`~scmamba2_scvi.data.TokenCollate`), padded or packed.
    budget
        Bytes available; default: :func:`available_bytes` of the module's device.

    Returns
    -------
    The cells per recomputed group, or ``None``.
    """
    memory = getattr(module, "_step_memory", None)
    if memory is None:
        memory = module._step_memory = measure_step_memory(module, _first_cell(tokens))
    device = next(module.parameters()).device
    n_cells, seqlen = batch_shape(tokens)
    keep_heap(module, _HEAP_SLACK_STEPS * memory.peak(n_cells, seqlen))
    if budget is None:
        budget = available_bytes(device)
    keep = keeps_activations(memory, n_cells, seqlen, budget)
    module.encoder.keep_activations = keep
    module.encoder.checkpoint_cells = None if keep else plan_groups(memory, n_cells, seqlen, budget)
    return module.encoder.checkpoint_cells
