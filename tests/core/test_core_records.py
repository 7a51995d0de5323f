"""The record reader the shell owns: the same records as ``Record.from_json``, remembered
per reader, and nothing shared between two readers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tm_sidecar.core import Backoff, NodeId, Record, Records, State, TaskOptions

OPTIONS = TaskOptions(queue="q", max_attempts=5, timeout_s=30.0, backoff=Backoff(base_s=2.0))


def text(i: int) -> str:
    return Record(
        state=State.PROCESSING, attempts=1, options=OPTIONS, since_at=float(i), node=NodeId("n")
    ).to_json()


@pytest.mark.parametrize(
    "value",
    [
        text(1),
        " " + text(1),  # not as we write it: the long way, same answer
        text(1) + "\n",
        '{"attempts":2,"since_at":3,"options":{"queue":"x","backoff":{"base_s":1}}}',
    ],
)
def test_a_reader_parses_what_from_json_parses(value: str) -> None:
    records = Records()
    assert records.parse(State.PROCESSING, value) == Record.from_json(State.PROCESSING, value)
    assert records.parse_once(State.PROCESSING, value) == Record.from_json(State.PROCESSING, value)


def test_a_reader_remembers_records_and_options_and_shares_them_with_no_other() -> None:
    one, two = Records(), Records()
    first = one.parse(State.PROCESSING, text(1))
    assert one.parse(State.PROCESSING, text(1)) is first
    assert one.parse_once(State.PROCESSING, text(1)) is not first  # a listing's: not kept
    # Records differ, their options are one object per reader.
    assert one.parse_once(State.PROCESSING, text(2)).options is first.options
    assert two.parse(State.PROCESSING, text(1)) is not first
    assert two.parse(State.PROCESSING, text(1)).options is not first.options


def test_a_reader_stays_within_its_bounds() -> None:
    records = Records(max_records=2, max_options=1)
    first = records.parse(State.PROCESSING, text(1))
    for i in range(2, 5):
        records.parse(State.PROCESSING, text(i))
    assert records.parse(State.PROCESSING, text(1)) is not first  # forgotten
    other = TaskOptions(queue="other")
    value = Record(state=State.PENDING, options=other, since_at=1.0).to_json()
    assert records.parse(State.PENDING, value).options == other


def test_malformed_values_fail_as_from_json_fails() -> None:
    with pytest.raises(ValueError, match="queue"):
        Records().parse(State.PENDING, '{"options":{"queue":"bad name!"}}')
    with pytest.raises(json.JSONDecodeError):
        Records().parse(State.PENDING, "{not json")


NEWER = (
    '{"attempts":1,"since_at":2.0,"lineage":[1,2],"node":"n","session":5,'
    '"options":{"queue":"q","max_attempts":5,"shard":{"k":1},"backoff":{"base_s":2.0}}}'
)


def test_fields_of_a_newer_release_are_kept_through_a_rewrite() -> None:
    """A rolling upgrade runs old and new sidecars on one namespace: what this release
    does not know, in the record or in its options, it writes back as it read it."""
    for record in (
        Record.from_json(State.PROCESSING, NEWER),
        Records().parse(State.PROCESSING, NEWER),
    ):
        again = json.loads(record.to_json())
        assert again["lineage"] == [1, 2]
        assert again["options"]["shard"] == {"k": 1}
        assert again["options"]["queue"] == "q"
        assert again["node"] == "n"
    # Nothing unknown: nothing kept, and the same text as before.
    assert Record.from_json(State.PROCESSING, text(1)).extra == ""
    assert Record.from_json(State.PROCESSING, text(1)).to_json() == text(1)


def test_options_that_differ_only_in_unknown_fields_are_not_confused() -> None:
    records = Records()
    one = records.parse(State.PENDING, '{"since_at":1,"options":{"queue":"q","shard":1}}')
    two = records.parse(State.PENDING, '{"since_at":1,"options":{"queue":"q","shard":2}}')
    assert json.loads(one.options.extra) == {"shard": 1}
    assert json.loads(two.options.extra) == {"shard": 2}


def test_every_move_carries_the_unknown_fields_on() -> None:
    from tm_sidecar.core import (
        TaskError,
        after_failure,
        assigned,
        cancelled,
        handed_back,
        promoted,
        retried,
        snoozed,
        succeeded,
    )

    live = Record.from_json(State.PROCESSING, NEWER)
    error = TaskError(type="E", message="m")
    moved = [
        assigned(live, node=NodeId("m"), session=1, now=3.0, grace_s=1.0),
        succeeded(live, result=1, now=3.0),
        after_failure(live, error=error, now=3.0, fraction=0.5),
        after_failure(live, error=error, now=3.0, fraction=0.5, backoff=False),
        after_failure(attrs_evolve(live, attempts=5), error=error, now=3.0, fraction=0.5),
        handed_back(live, now=3.0),
        handed_back(attrs_evolve(live, handbacks=9), now=3.0),
        snoozed(live, delay_s=1.0, now=3.0),
        snoozed(live, delay_s=0.0, now=3.0),
        snoozed(attrs_evolve(live, snoozes=1000), delay_s=1.0, now=3.0),
        cancelled(live, now=3.0),
        retried(live, now=3.0),
        promoted(attrs_evolve(live, state=State.DELAYED, due_at=1.0), now=3.0),
    ]
    for record in moved:
        assert json.loads(record.to_json())["lineage"] == [1, 2], record
        assert json.loads(record.to_json())["options"]["shard"] == {"k": 1}, record


def attrs_evolve(record: Record, **changes: Any) -> Record:
    import attrs

    return attrs.evolve(record, **changes)


@pytest.mark.parametrize(
    ("value", "version", "stored"),
    [(None, 1, False), ('{"layout":1}', 1, True), ('{"layout":7,"by":"x"}', 7, True)],
)
def test_the_layout_key_is_read(value: str | None, version: int, stored: bool) -> None:
    from tm_sidecar.core import Layout, read_layout

    assert read_layout(value) == Layout(version, stored=stored)


@pytest.mark.parametrize("value", ["", "7", '{"layout":"2"}', '{"layout":0}', '{"layout":true}'])
def test_a_layout_key_that_is_not_ours_is_refused(value: str) -> None:
    from tm_sidecar.core import read_layout

    with pytest.raises(ValueError, match="layout"):
        read_layout(value)


def test_a_newer_layout_is_refused_with_the_way_out() -> None:
    from tm_sidecar.core import LAYOUT, Layout, LayoutRefused, check_layout

    check_layout(Layout(LAYOUT, stored=True), key="/tm/x/layout")
    with pytest.raises(LayoutRefused, match=r"layout is 2 \(/tm/x/layout\).*operations.md"):
        check_layout(Layout(2, stored=True), key="/tm/x/layout", known=1)


def test_a_traced_tasks_options_are_its_own() -> None:
    """Options that differ only in their trace context are not taken for one another
    (the table remembers untraced options by their other fields)."""
    records = Records()
    plain = Record(state=State.PENDING, options=TaskOptions(), since_at=1.0)
    traced_options = TaskOptions(traceparent=f"00-{'a' * 32}-{'b' * 16}-01", tracestate="k=v")
    traced = Record(state=State.PENDING, options=traced_options, since_at=1.0)
    assert records.parse(State.PENDING, plain.to_json()).options.traceparent is None
    parsed = records.parse(State.PENDING, traced.to_json()).options
    assert parsed == traced_options
    assert parsed.trace_id == "a" * 32
    assert records.parse(State.PENDING, plain.to_json()).options == TaskOptions()


def test_a_trace_context_is_w3cs_or_refused() -> None:
    with pytest.raises(ValueError, match="tracestate needs a traceparent"):
        TaskOptions(tracestate="k=v")
    with pytest.raises(ValueError, match="traceparent must be a W3C traceparent"):
        TaskOptions(traceparent=f"00-{'0' * 32}-{'b' * 16}-01")  # an all-zero trace id
    with pytest.raises(ValueError, match="at most 512"):
        TaskOptions(traceparent=f"00-{'a' * 32}-{'b' * 16}-01", tracestate="k=" + "v" * 600)
