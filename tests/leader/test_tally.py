"""What the leader counts for metrics (tm_sidecar/leader/_tally.py): how long each queue
was held back, by reason, closed and open intervals alike."""

from __future__ import annotations

from tm_sidecar.leader._tally import HeldTime


def test_held_time_counts_each_queue_and_reason_while_it_lasts() -> None:
    held = HeldTime()
    held.update({"mail": "paused"}, 10.0)
    held.update({"mail": "paused", "pay": "rate_limited"}, 12.0)
    assert held.seconds(13.0) == {("mail", "paused"): 3.0, ("pay", "rate_limited"): 1.0}
    held.update({"pay": "rate_limited"}, 15.0)  # mail resumed
    held.update({"pay": "paused"}, 16.0)  # the reason changed
    assert held.seconds(20.0) == {
        ("mail", "paused"): 5.0,
        ("pay", "rate_limited"): 4.0,
        ("pay", "paused"): 4.0,
    }
    held.update({}, 21.0)  # leading here ends: nothing more counts
    assert held.seconds(100.0) == {
        ("mail", "paused"): 5.0,
        ("pay", "rate_limited"): 4.0,
        ("pay", "paused"): 5.0,
    }
