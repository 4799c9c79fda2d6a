"""Checksums of saved weights: written beside ``model.pt`` at save, verified before loading."""

from __future__ import annotations

import hashlib
import zipfile
from os import PathLike
from pathlib import Path

__all__ = ["CHECKSUM_SUFFIX", "verify_weights", "write_checksum"]

#: Suffix of the checksum file: ``model.pt`` gets ``model.pt.sha256`` (``sha256sum`` format).
CHECKSUM_SUFFIX = ".sha256"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(weights: str | PathLike) -> Path:
    """Write the SHA-256 of a weights file beside it.

    Parameters
    ----------
    weights
        The weights file, e.g. ``model_dir/model.pt``.

    Returns
    -------
    Path of the checksum file (``model.pt.sha256``; ``sha256sum -c`` reads it).
    """
    weights = Path(weights)
    out = weights.with_name(weights.name + CHECKSUM_SUFFIX)
    out.write_text(f"{_sha256(weights)}  {weights.name}\n", encoding="utf-8")
    return out


def verify_weights(weights: str | PathLike) -> bool:
    """Check that a weights file is complete and, when it has a checksum, unchanged.

    Parameters
    ----------
    weights
        The weights file, e.g. ``model_dir/model.pt``.

    Returns
    -------
    ``True`` when a checksum was verified; ``False`` for a file saved without one (older
    versions), which is then only checked to be a complete PyTorch archive.

    Raises
    ------
    FileNotFoundError
        When the file is missing.
    ValueError
        When the file is empty, truncated or not a PyTorch file, or its checksum differs.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} does not exist: the folder {weights.parent} holds no saved weights. "
            "Pass the folder a model was saved to (model.save(...) or scmamba2 finetune --out)."
        )
    redo = "the file is damaged; save the model again or restore it from a copy."
    if weights.stat().st_size == 0:
        raise ValueError(f"{weights} is empty: {redo}")
    if not zipfile.is_zipfile(weights):
        raise ValueError(f"{weights} is not a complete PyTorch file (truncated or corrupt): {redo}")
    checksum = weights.with_name(weights.name + CHECKSUM_SUFFIX)
    if not checksum.is_file():
        return False
    expected = checksum.read_text(encoding="utf-8").split()[:1]
    if expected != [_sha256(weights)]:
        raise ValueError(
            f"{weights} does not match its checksum {checksum.name}: {redo} (Delete "
            f"{checksum.name} only if you changed the weights on purpose.)"
        )
    return True
