"""Small helpers shared by the model, its builder and its training plan."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def check_keywords(where: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a ``TypeError`` naming the keyword arguments of ``given`` not in ``valid``.

    Parameters
    ----------
    where
        The call that received them, e.g. ``"SCMamba2()"``.
    given
        Keyword arguments passed.
    valid
        Keyword arguments ``where`` accepts.
    """
    valid = sorted(valid)
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, valid, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{where} got unexpected keyword argument(s) {', '.join(hints)}; valid ones: "
        f"{', '.join(valid)}."
    )
