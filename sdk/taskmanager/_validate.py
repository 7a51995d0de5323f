"""Checks of what the application hands the SDK, made where it is handed over.

``json.dumps`` would accept some of it silently (integer keys become strings, NaN
becomes a token no JSON parser reads) and refuse the rest far from the call that gave
it, with a ``TypeError`` that names no field. These checks raise
:class:`InvalidRequest` naming the field's path instead.
"""

from __future__ import annotations

import math
from typing import Any

from .protocol import InvalidRequest

_SCALARS = (str, int, float, bool, type(None))


def check_json(value: Any, name: str) -> None:
    """Raise :class:`InvalidRequest` unless ``value`` is plain JSON, naming the bad path.

    JSON here is what the protocol carries: dicts with string keys, lists (tuples too),
    strings, finite numbers, booleans and None.
    """
    # An explicit stack, not recursion: deep data must not hit the recursion limit here.
    stack: list[tuple[Any, str, frozenset[int]]] = [(value, name, frozenset())]
    while stack:
        item, path, parents = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequest(f"{path} is {item!r}, which JSON cannot carry")
        elif isinstance(item, _SCALARS):
            continue
        elif isinstance(item, dict | list | tuple):
            if id(item) in parents:
                raise InvalidRequest(f"{path} contains itself")
            inner = parents | {id(item)}
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise InvalidRequest(
                            f"{path} has the key {key!r} ({type(key).__name__}): "
                            "JSON keys are strings"
                        )
                    stack.append((sub, f"{path}[{key!r}]", inner))
            else:
                stack.extend((sub, f"{path}[{i}]", inner) for i, sub in enumerate(item))
        else:
            raise InvalidRequest(f"{path} is a {type(item).__name__}, which is not JSON")


def positive_number(value: Any, name: str) -> float:
    """``value`` as a float, if it is a finite number above zero."""
    number = finite_number(value, name)
    if number <= 0:
        raise InvalidRequest(f"{name} must be above zero, not {value!r}")
    return number


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float, if it is a finite number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, not {value!r}")
    return float(value)


def whole_number(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value``, if it is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}, not {value!r}")
    return value
