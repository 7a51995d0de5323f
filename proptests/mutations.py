"""Evidence that the property tests bite: plant known bugs, one at a time, in a copy of
the repository, and check that the core state machine fails on each.

    python -m proptests.mutations            # every mutation
    python -m proptests.mutations no-fence   # one of them

Each run prints, per mutation, CAUGHT with the shrunk counterexample Hypothesis printed,
or MISSED; it exits 1 if any mutation was missed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class Mutation:
    """A one-line bug: replace ``old`` by ``new`` in ``path``."""

    name: str
    path: str
    old: str
    new: str
    breaks: str


MUTATIONS = [
    Mutation(
        "no-fence",
        "tm_sidecar/core/_plan.py",
        "compare: list[Compare] = [fence.compare()]",
        "compare: list[Compare] = []",
        "a deposed leader's writes must fail (fencing)",
    ),
    Mutation(
        "stale-outcome-accepted",
        "tm_sidecar/core/_plan.py",
        "compare = [Compare.created_at(slot.key, slot.create_revision)]",
        "compare = []",
        "a report for an attempt that has ended must be rejected",
    ),
    Mutation(
        "early-promotion",
        "tm_sidecar/core/_leader.py",
        "while self._due and self._due[0][0] <= now:",
        "while self._due and self._due[0][0] <= now + 1.0:",
        "a delayed task is never assigned before its due time",
    ),
    Mutation(
        "capacity-off-by-one",
        "tm_sidecar/core/_leader.py",
        "room = cap - self.inflight.get((node_id, queue), 0)",
        "room = cap + 1 - self.inflight.get((node_id, queue), 0)",
        "a node never holds more tasks than its capacity",
    ),
    Mutation(
        "priority-ignored",
        "tm_sidecar/core/_leader.py",
        "heapq.heappush(heap, (-record.options.priority, kv.create_revision, tid))",
        "heapq.heappush(heap, (0, kv.create_revision, tid))",
        "higher priority first, then commit order",
    ),
    Mutation(
        "one-attempt-too-many",
        "tm_sidecar/core/_policy.py",
        "if not error.retryable or record.attempts >= record.options.max_attempts:",
        "if not error.retryable or record.attempts > record.options.max_attempts:",
        "attempts never exceed max_attempts",
    ),
    Mutation(
        "claims-never-released",
        "tm_sidecar/core/_leader.py",
        "committed_at <= self.revision:\n            self._release(batch.task_ids)",
        "committed_at <= self.revision:\n            pass",
        "a task whose move failed is tried again (no task is forgotten)",
    ),
    Mutation(
        "restarted-node-keeps-work",
        "tm_sidecar/core/_leader.py",
        "if node is None or node.session != slot.record.session:",
        "if node is None:",
        "a restarted node's old assignments are reaped",
    ),
    Mutation(
        "attempt-forgotten-when-it-ends",
        "tm_sidecar/core/_attempts.py",
        "            self._attempts[key] = False",
        "            del self._attempts[key]",
        "an attempt starts at most once on a node, even delivered again after it ended",
    ),
    Mutation(
        "assign-to-any-session",
        "tm_sidecar/core/_plan.py",
        "compare.extend(_session_guards(ks, moves))",
        "compare.extend([])",
        "an assignment goes only to a node's current session",
    ),
    Mutation(
        "cancel-unguarded",
        "tm_sidecar/core/_plan.py",
        "        compare=(guard,),",
        "        compare=(),",
        "a cancel moves the task only from the state it was seen in",
    ),
    Mutation(
        "pause-unguarded",
        "tm_sidecar/core/_batch.py",
        'out.append(Batch("assign", tuple(chunk), guards=(guard,), extra=extra))',
        'out.append(Batch("assign", tuple(chunk), guards=(), extra=extra))',
        "nothing is assigned from a paused queue, even decided just before the pause",
    ),
    Mutation(
        "unique-unguarded",
        "tm_sidecar/core/_plan.py",
        "        compare.extend(guards)",
        "        compare.extend(())",
        "never two live tasks with one unique key",
    ),
    Mutation(
        "snooze-unbounded",
        "tm_sidecar/core/_policy.py",
        "    if record.snoozes >= record.options.max_snoozes:",
        "    if False:",
        "a task snoozes at most max_snoozes times, then fails",
    ),
    Mutation(
        "snooze-counts-the-attempt",
        "tm_sidecar/core/_policy.py",
        "    spent = max(record.attempts - 1, 0)",
        "    spent = record.attempts",
        "a snooze does not count an attempt",
    ),
    Mutation(
        "key-limit-ignores-claims",
        "tm_sidecar/core/_leader.py",
        "            self.keys.add(queue, key)",
        "            pass",
        "never more tasks of one concurrency key running than its limit, claims included",
    ),
    Mutation(
        "queue-limit-ignores-claims",
        "tm_sidecar/core/_leader.py",
        "running = sum(n for (_, q), n in self.inflight.items() if q == queue)",
        "running = sum(s.record.options.queue == queue for s in self.processing.values())",
        "never more tasks of a queue running than max_running, assignments in flight included",
    ),
    Mutation(
        "rate-forgotten-on-failover",
        "tm_sidecar/core/_leader.py",
        "            if window not in self.rate_windows:  # a listing",
        "            if False:  # a listing",
        "a new leader starts no more than the rate allows in any window",
    ),
    Mutation(
        "rate-window-too-short",
        "tm_sidecar/core/_flow.py",
        "        since = now - rate.period_s",
        "        since = now - rate.period_s / 2",
        "no window of a rate's period holds more starts than its limit",
    ),
    Mutation(
        "rate-change-ignores-forgotten-starts",
        "tm_sidecar/core/_flow.py",
        "        if self.forgotten is not None and self.forgotten > since:",
        "        if False:",
        "a longer period counts the starts made before the change, even those forgotten",
    ),
    Mutation(
        "rate-slack-ignored",
        "tm_sidecar/core/_flow.py",
        "        since = now - rate.window_s",
        "        since = now - rate.period_s",
        "a rate with slack counts its window that much longer (starts keep to it)",
    ),
    Mutation(
        "schedule-slot-skipped",
        "tm_sidecar/core/_schedule.py",
        "        k = max(math.floor((after - anchor) / every) + 1, 1)",
        "        k = max(math.floor((after - anchor) / every) + 2, 1)",
        "no schedule slot is lost while a leader exists",
    ),
    Mutation(
        "missed-slots-burst",
        "tm_sidecar/core/_schedule.py",
        '    if schedule.missed != "all":',
        "    if False:",
        "skip and one fire one slot at most: missed slots are dropped or coalesced",
    ),
    Mutation(
        "firing-not-claimed",
        "tm_sidecar/core/_leader.py",
        "            self._firing.add(name)",
        "            pass",
        "a slot fires once: a firing in flight is not planned again",
    ),
    Mutation(
        "firing-unguarded",
        "tm_sidecar/core/_schedule.py",
        "    guards = (Compare.modified_at(kv.key, kv.mod_revision), *compares)",
        "    guards = ()",
        "a slot fires once, whoever leads (the firing compares its schedule and tasks)",
    ),
    Mutation(
        "permanent-error-retried",
        "tm_sidecar/core/_outcome.py",
        "            return failed(error)",
        "            return failed(attrs.evolve(error, retryable=True))",
        "a handler's permanent failure fails the task at once, whatever attempts are left",
    ),
    Mutation(
        "conflict-read-as-deposed",
        "tm_sidecar/core/_batch.py",
        "    if not fence_kvs or fence_kvs[0].create_revision != fence.revision:",
        "    if not fence_kvs or fence_kvs[0].create_revision == fence.revision:",
        "a stale view's batch is a conflict (decide again), not a lost leadership",
    ),
]


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_mutation(m: Mutation) -> tuple[bool, str]:
    """Apply one mutation in a temporary copy; answers (caught, what the tests printed)."""
    with tempfile.TemporaryDirectory(prefix=f"tm-mutant-{m.name}-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        target = copy / m.path
        text = target.read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutation {m.name}: the line to change is not found once in {m.path}")
        target.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        check = subprocess.run(
            [sys.executable, "-c", "import tm_sidecar; print(tm_sidecar.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert check.stdout.strip().startswith(str(copy)), (
            "the mutant copy was not the one imported"
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "proptests/test_core_machine.py",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "--hypothesis-profile=mutation",
                "-W",
                "ignore::pytest.PytestAssertRewriteWarning",
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return run.returncode != 0, run.stdout + run.stderr


def counterexample(output: str) -> str:
    """The last shrunk program Hypothesis printed, with its assertion."""
    lines = [ln.strip().lstrip("E|").strip() for ln in output.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("AssertionError")]
    if not starts:
        return "\n".join(lines[-20:])
    block = []
    for ln in lines[starts[-1] :]:
        if ln.startswith(("AssertionError", "state", "nodes_")):
            block.append(ln)
        if ln.startswith("state.teardown()"):
            break
    return "\n".join(block)


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or m.name in argv]
    missed = []
    for m in chosen:
        caught, output = run_mutation(m)
        print(f"== {m.name}: {'CAUGHT' if caught else 'MISSED'}  ({m.breaks})")
        if caught:
            print(counterexample(output))
        else:
            missed.append(m.name)
        print(flush=True)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
