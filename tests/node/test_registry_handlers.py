"""In-process handlers are async (issue 20 item 2): they run on the sidecar's event loop,
where a timeout cancels them at their next ``await``. A plain function would block the
loop (every task of the node, and its lease) and could not be stopped: refused."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from tm_sidecar.node._registry import Registry


async def handler(task: Any) -> None:
    return None


class Callable:
    async def __call__(self, task: Any) -> None:
        return None


def plain(task: Any) -> None:
    return None


def test_a_plain_function_is_refused_with_what_to_do() -> None:
    registry = Registry()
    with pytest.raises(TypeError, match=r"'plain' must be an async function.*pool='process'"):
        registry.register("default", plain, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async function"):
        registry.register("default", lambda task: None, 1)  # type: ignore[arg-type,return-value]


def test_async_functions_methods_objects_and_partials_are_taken() -> None:
    registry = Registry()
    for each in (handler, Callable(), functools.partial(handler), Callable().__call__):
        assert registry.register("default", each, 1).handler is each
