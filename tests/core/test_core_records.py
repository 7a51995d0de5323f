"""The record reader the shell owns: the same records as ``Record.from_json``, remembered
per reader, and nothing shared between two readers."""

from __future__ import annotations

import json

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
