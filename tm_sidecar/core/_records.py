"""`Records`: the parse cache a sidecar owns and passes to its leader, agent and hub, so
that a change all three see is parsed once (the core keeps no such state itself)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import attrs

from ._keys import State
from ._model import JSON, OPTION_FIELDS, Record, TaskOptions, unknown_fields


@attrs.define(eq=False)
class Records:
    """A reader of state records that remembers: the leader, the agent and the event hub
    of one sidecar each see every change, and parsing is most of what a change costs
    them (a record parsed again is about 3x dearer than one remembered; options shared
    by most tasks, built once, save 40% of a first parse).

    The shell owns one per sidecar and gives it to each reader; the leader's listing
    thread uses it too, which is safe: the record cache is an ``functools.lru_cache``,
    and each step on the options table is one dict operation.
    """

    max_records: int = 8192
    max_options: int = 1024
    _remembered: Callable[[State, str], Record] = attrs.field(init=False, repr=False)
    _options: dict[tuple[object, ...], TaskOptions] = attrs.field(
        init=False, factory=dict, repr=False
    )
    _traced: dict[tuple[object, ...], TaskOptions] = attrs.field(
        init=False, factory=dict, repr=False
    )
    _decoder: json.JSONDecoder = attrs.field(init=False, factory=json.JSONDecoder, repr=False)

    def __attrs_post_init__(self) -> None:
        self._remembered = functools.lru_cache(maxsize=self.max_records)(self.parse_once)

    def parse(self, state: State, text: str) -> Record:
        """``Record.from_json``, remembered."""
        return self._remembered(state, text)

    def parse_once(self, state: State, text: str) -> Record:
        """``Record.from_json``, not remembered (a listing's values are seen once: they
        would only churn the cache), though its options are."""
        return Record.from_obj(state, self._loads(text), options=self.options)

    def options(self, obj: dict[str, JSON]) -> TaskOptions:
        """``TaskOptions.from_json``, each set of options built once (they are immutable)."""
        backoff = obj.get("backoff") or {}
        try:
            key = (
                obj.get("queue"),
                obj.get("priority"),
                obj.get("max_attempts"),
                obj.get("timeout_s"),
                tuple(sorted(backoff.items())) if isinstance(backoff, dict) else backoff,
                obj.get("unique_key"),
                obj.get("unique_for_s"),
                obj.get("concurrency_key"),
                obj.get("max_snoozes"),
                unknown_fields(obj, OPTION_FIELDS),
                obj.get("traceparent"),
                obj.get("tracestate"),
            )
            hash(key)
        except TypeError:  # something unhashable: parse it the long way (and fail there)
            return TaskOptions.from_json(obj)
        # Each traced task's options are its own (its trace): remembered apart, the
        # oldest dropped first, so that they never push the shared ones out.
        table = self._options if key[-2] is None else self._traced
        options = table.get(key)
        if options is None:
            if len(table) >= self.max_options:
                if table is self._options:
                    table.clear()
                else:
                    try:
                        del table[next(iter(table))]
                    except (RuntimeError, KeyError, StopIteration):  # the listing thread
                        table.clear()
            options = table[key] = TaskOptions.from_json(obj)
        return options

    def _loads(self, text: str) -> Any:
        """``json.loads`` of a value we wrote (compact, an object), a little faster
        (``raw_decode`` skips the whitespace checks around it); anything else takes the
        long way."""
        try:
            obj, end = self._decoder.raw_decode(text)
        except json.JSONDecodeError:
            return json.loads(text)
        if end != len(text):
            return json.loads(text)
        return obj
