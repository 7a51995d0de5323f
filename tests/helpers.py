"""Waiting on things without sleeping: collections that wake their waiters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Observed(Generic[T]):
    """A list that tasks can wait on until a condition over it holds."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = trio.Event()

    def add(self, item: T) -> None:
        """Append and wake every waiter."""
        self.items.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(
        self, condition: Callable[[list[T]], bool], timeout_s: float = 10.0
    ) -> None:
        """Return once ``condition(items)`` holds; fail after ``timeout_s``."""
        with trio.fail_after(timeout_s):
            while not condition(self.items):
                await self._changed.wait()
