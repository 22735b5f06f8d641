"""Argument checks shared by the conversion stages: each error names the parameter as the caller wrote it
and says what is allowed."""

from __future__ import annotations

import math
import numbers


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """A finite real number > 0 (a learning rate, a temperature); ``bool`` is refused."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)
