"""Argument checks shared by the public functions, so that one kind of bad value gets one message everywhere."""

from __future__ import annotations

import numbers


def whole_number(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int, or a ValueError naming ``name``.

    Numpy integers are whole numbers; bools (``True`` would count as 1) and floats (even ``2.0``) are not, and a
    non-number gets this message rather than a TypeError from a comparison or ``range`` later on.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" ≥ {minimum}"
        raise ValueError(f"{name} must be a whole number{bound}, got {value!r}")
    return int(value)
