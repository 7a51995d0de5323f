"""Evidence that the property tests bite: plant known bugs, one at a time, in a copy of
the repository, and check that the core state machine fails on each, by the property
the bug breaks.

    python -m proptests.mutations                 # every mutation, after the control
    python -m proptests.mutations no-fence        # one of them (names, or --list)
    python -m proptests.mutations --share 3       # this run's share: 3 of them, rotating

First the unmutated tree runs as a control: it must pass, or nothing else is judged.
Then each mutant: CAUGHT when the tests fail with an ``AssertionError`` whose message
matches the mutation's ``caught_by`` (the invariant it targets); WRONG when they fail
otherwise (another assertion, an exception of another kind: the bug was found, but not
by the property meant to find it); MISSED when they pass. Hypothesis runs derandomized
(the ``mutation`` profile), so a verdict is the same in every run of the same tree;
boundaries the random programs reach only now and then have explicit programs in
``proptests/test_core_machine.py``. Exits 1 unless every chosen mutation is CAUGHT, 2 if
the control fails.

The suite runs a share of them in every run (``test_mutations.py``), chosen by the day,
so that every mutation is checked within a few days of CI; the whole set is
``pytest -m slow proptests`` or this command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import attrs

ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class Mutation:
    """A one-line bug: replace ``old`` by ``new`` in ``path``; ``caught_by`` is a regular
    expression the failing assertion's message matches (the property the bug breaks)."""

    name: str
    path: str
    old: str
    new: str
    breaks: str
    caught_by: str


MUTATIONS = [
    Mutation(
        "no-fence",
        "tm_sidecar/core/_plan.py",
        "compare: list[Compare] = [fence.compare()]",
        "compare: list[Compare] = []",
        "a deposed leader's writes must fail (fencing)",
        r"a deposed leader's \w+ batch committed",
    ),
    Mutation(
        "stale-outcome-accepted",
        "tm_sidecar/core/_plan.py",
        "compare = [Compare.created_at(slot.key, slot.create_revision)]",
        "compare = []",
        "a report for an attempt that has ended must be rejected",
        r"a stale report was accepted",
    ),
    Mutation(
        "early-promotion",
        "tm_sidecar/core/_leader.py",
        "while self._due and self._due[0][0] <= now:",
        "while self._due and self._due[0][0] <= now + 1.0:",
        "a delayed task is never assigned before its due time",
        r"promoted at .* before due",
    ),
    Mutation(
        "capacity-off-by-one",
        "tm_sidecar/core/_leader.py",
        "room = cap - self.inflight.get((node_id, queue), 0)",
        "room = cap + 1 - self.inflight.get((node_id, queue), 0)",
        "a node never holds more tasks than its capacity",
        r"holds \d+ > \d+",
    ),
    Mutation(
        "priority-ignored",
        "tm_sidecar/core/_leader.py",
        "    return (-record.options.priority, order, slot.create_revision, slot.task_id)",
        "    return (0, order, slot.create_revision, slot.task_id)",
        "higher priority first, then commit order",
        r"skipped for worse tasks",
    ),
    Mutation(
        "requeue-to-the-back",
        "tm_sidecar/core/_leader.py",
        "    order = place(record.order, slot.create_revision)",
        "    order = slot.create_revision",
        "a task requeued because its node was lost or handed back keeps its place",
        r"skipped for worse tasks|lost its place",
    ),
    Mutation(
        "requeue-overtaken-in-flight",
        "tm_sidecar/core/_leader.py",
        "            if barrier is not None and heap[0][:2] > barrier:",
        "            if False:",
        "nothing committed after a lost node's task starts while that task is on its way back",
        r"skipped for worse tasks",
    ),
    Mutation(
        "one-attempt-too-many",
        "tm_sidecar/core/_policy.py",
        "if not error.retryable or record.attempts >= record.options.max_attempts:",
        "if not error.retryable or record.attempts > record.options.max_attempts:",
        "attempts never exceed max_attempts",
        r"expected failed, got State\.(DELAYED|PENDING)",
    ),
    Mutation(
        "claims-never-released",
        "tm_sidecar/core/_leader.py",
        "committed_at <= self.revision:\n            self._release(batch.task_ids)",
        "committed_at <= self.revision:\n            pass",
        "a task whose move failed is tried again (no task is forgotten)",
        r"wait while \d+ slots are free|skipped for worse tasks",
    ),
    Mutation(
        "restarted-node-keeps-work",
        "tm_sidecar/core/_leader.py",
        "if node is None or node.session != slot.record.session:",
        "if node is None:",
        "a restarted node's old assignments are reaped",
        r"kept by a restarted node",
    ),
    Mutation(
        "attempt-forgotten-when-it-ends",
        "tm_sidecar/core/_attempts.py",
        "            self._attempts[key] = False",
        "            del self._attempts[key]",
        "an attempt starts at most once on a node, even delivered again after it ended",
        r"started twice on",
    ),
    Mutation(
        "assign-to-any-session",
        "tm_sidecar/core/_plan.py",
        "compare.extend(_session_guards(ks, moves))",
        "compare.extend([])",
        "an assignment goes only to a node's current session",
        r"whose current session is",
    ),
    Mutation(
        "cancel-unguarded",
        "tm_sidecar/core/_plan.py",
        "        compare=(guard,),",
        "        compare=(),",
        "a cancel moves the task only from the state it was seen in",
        r"a cancel of a stale state was accepted",
    ),
    Mutation(
        "pause-unguarded",
        "tm_sidecar/core/_batch.py",
        'out.append(Batch("assign", tuple(chunk), guards=(guard,), extra=extra))',
        'out.append(Batch("assign", tuple(chunk), guards=(), extra=extra))',
        "nothing is assigned from a paused queue, even decided just before the pause",
        r"assigned from a paused queue",
    ),
    Mutation(
        "unique-unguarded",
        "tm_sidecar/core/_plan.py",
        "        compare.extend(guards)",
        "        compare.extend(())",
        "never two live tasks with one unique key",
        r"share unique key",
    ),
    Mutation(
        "snooze-unbounded",
        "tm_sidecar/core/_policy.py",
        "    if record.snoozes >= record.options.max_snoozes:",
        "    if False:",
        "a task snoozes at most max_snoozes times, then fails",
        r"snoozed past its limit",
    ),
    Mutation(
        "snooze-counts-the-attempt",
        "tm_sidecar/core/_policy.py",
        "    spent = max(record.attempts - 1, 0)",
        "    spent = record.attempts",
        "a snooze does not count an attempt",
        r"counts \d+ attempts, the model \d+",
    ),
    Mutation(
        "key-limit-ignores-claims",
        "tm_sidecar/core/_leader.py",
        "            self.keys.add(queue, key)",
        "            pass",
        "never more tasks of one concurrency key running than its limit, claims included",
        r"of key \w+ running over",
    ),
    Mutation(
        "queue-limit-ignores-claims",
        "tm_sidecar/core/_leader.py",
        "running = sum(n for (_, q), n in self.inflight.items() if q == queue)",
        "running = sum(s.record.options.queue == queue for s in self.processing.values())",
        "never more tasks of a queue running than max_running, assignments in flight included",
        r"running over max_running",
    ),
    Mutation(
        "rate-forgotten-on-failover",
        "tm_sidecar/core/_leader.py",
        "            if window not in self.rate_windows:  # a listing",
        "            if False:  # a listing",
        "a new leader starts no more than the rate allows in any window",
        r"\d+ starts in [\d.]+ s",
    ),
    Mutation(
        "rate-window-too-short",
        "tm_sidecar/core/_flow.py",
        "        since = now - rate.window_s",
        "        since = now - rate.window_s / 2",
        "no window of a rate's period holds more starts than its limit",
        r"\d+ starts in [\d.]+ s",
    ),
    Mutation(
        "rate-change-ignores-forgotten-starts",
        "tm_sidecar/core/_flow.py",
        "        if self.forgotten is not None and self.forgotten > since:",
        "        if False:",
        "a longer period counts the starts made before the change, even those forgotten",
        r"\d+ starts in [\d.]+ s",
    ),
    Mutation(
        "rate-slack-ignored",
        "tm_sidecar/core/_flow.py",
        "        since = now - rate.window_s",
        "        since = now - rate.period_s",
        "a rate with slack counts its window that much longer (starts keep to it)",
        r"\d+ starts in [\d.]+ s",
    ),
    Mutation(
        "schedule-slot-skipped",
        "tm_sidecar/core/_schedule.py",
        "        k = max(math.floor((after - anchor) / every) + 1, 1)",
        "        k = max(math.floor((after - anchor) / every) + 2, 1)",
        "no schedule slot is lost while a leader exists",
        r"lost slots|did not fire its latest slot",
    ),
    Mutation(
        "missed-slots-burst",
        "tm_sidecar/core/_schedule.py",
        '    if schedule.missed != "all":',
        "    if False:",
        "skip and one fire one slot at most: missed slots are dropped or coalesced",
        r"(skip|one) fired",
    ),
    Mutation(
        "firing-not-claimed",
        "tm_sidecar/core/_leader.py",
        "            self._firing.add(name)",
        "            pass",
        "a slot fires once: a firing in flight is not planned again",
        r"the live leader's fire batch failed",
    ),
    Mutation(
        "firing-unguarded",
        "tm_sidecar/core/_schedule.py",
        "    guards = (Compare.modified_at(kv.key, kv.mod_revision), *compares)",
        "    guards = ()",
        "a slot fires once, whoever leads (the firing compares its schedule and tasks)",
        r"a firing committed over a pause",
    ),
    Mutation(
        "permanent-error-retried",
        "tm_sidecar/core/_outcome.py",
        "            return failed(error)",
        "            return failed(attrs.evolve(error, retryable=True))",
        "a handler's permanent failure fails the task at once, whatever attempts are left",
        r"expected failed, got State\.(DELAYED|PENDING)",
    ),
    Mutation(
        "partial-bulk-create",
        "tm_sidecar/core/_bulk.py",
        "        compare=tuple(c for txn in txns for c in txn.compare),",
        "        compare=tuple(c for txn in txns[:1] for c in txn.compare),",
        "a bulk create's transaction lands whole or not at all: one taken id refuses it all",
        r"a bulk create's transaction committed over the taken id",
    ),
    Mutation(
        "conflict-read-as-deposed",
        "tm_sidecar/core/_batch.py",
        "    if not fence_kvs or fence_kvs[0].create_revision != fence.revision:",
        "    if not fence_kvs or fence_kvs[0].create_revision == fence.revision:",
        "a stale view's batch is a conflict (decide again), not a lost leadership",
        r"a stale view's batch read as Deposed",
    ),
    Mutation(
        "batch-outcome-to-wrong-attempt",
        "tm_sidecar/core/_flush.py",
        "compare=tuple(c for t in txns for c in t.compare),",
        "compare=tuple(txns[0].compare),",
        "an outcome in a batch of reports is applied only to its own, live attempt",
        r"applied to another attempt",
    ),
    Mutation(
        "prefetch-beyond-capacity",
        "tm_sidecar/core/_window.py",
        "free = self.concurrency - len(self._outstanding)",
        "free = self.concurrency + 1 - len(self._outstanding)",
        "a worker is pushed no more deliveries than its concurrency",
        r"a worker holds \d+ deliveries > its concurrency",
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


@attrs.frozen
class Verdict:
    """What a run of the state machine said of a tree."""

    kind: Literal["caught", "wrong", "missed", "passed", "failed"]
    #: The messages of the assertions that failed (the property that caught the bug).
    assertions: tuple[str, ...]
    output: str


#: A failure pytest reports: ``E   AssertionError: message`` (also inside exception
#: groups, where Hypothesis found several distinct failures).
_FAILURE = re.compile(r"^E?\s*[|+-]*\s*(\w+(?:Error|Exception|Group)): ?(.*)$")


def failures(output: str) -> list[tuple[str, str]]:
    """Every (exception type, message) the failing run reported."""
    found = []
    for line in output.splitlines():
        match = _FAILURE.match(line.strip())
        if match and not match.group(1).endswith("Group"):
            found.append((match.group(1), match.group(2).strip()))
    return found


def run_tree(m: Mutation | None, *, shrink: bool = True) -> Verdict:
    """Run the state machine on a copy of the tree, with ``m`` planted (None: the
    control), and judge the outcome. Without ``shrink`` the verdict is the same, sooner,
    with a longer counterexample."""
    prefix = f"tm-mutant-{m.name}-" if m else "tm-control-"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        if m is not None:
            target = copy / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(
                    f"mutation {m.name}: the line to change is not found once in {m.path}"
                )
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
                "--hypothesis-profile=" + ("mutation" if shrink else "mutation-quick"),
                "-W",
                "ignore::pytest.PytestAssertRewriteWarning",
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    output = run.stdout + run.stderr
    found = failures(output)
    asserted = tuple(msg for kind, msg in found if kind == "AssertionError")
    if m is None:
        return Verdict("passed" if run.returncode == 0 else "failed", asserted, output)
    if run.returncode == 0:
        return Verdict("missed", asserted, output)
    if any(re.search(m.caught_by, msg) for msg in asserted):
        return Verdict("caught", asserted, output)
    return Verdict("wrong", asserted, output)


def run_mutation(m: Mutation) -> tuple[bool, str]:
    """Apply one mutation in a temporary copy; answers (caught by its property, output)."""
    verdict = run_tree(m)
    return verdict.kind == "caught", verdict.output


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


def share(count: int, day: datetime.date | None = None) -> list[Mutation]:
    """``count`` mutations, a different run of them each day, so that successive days
    cover the whole list."""
    day = day or datetime.datetime.now(datetime.UTC).date()
    start = (day.toordinal() * count) % len(MUTATIONS)
    return [MUTATIONS[(start + i) % len(MUTATIONS)] for i in range(min(count, len(MUTATIONS)))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m proptests.mutations")
    parser.add_argument("names", nargs="*", help="mutations to run (default: every one)")
    parser.add_argument("--share", type=int, help="this day's share of N mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--no-shrink", action="store_true", help="judge without shrinking (faster, longer examples)"
    )
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.breaks}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"no such mutation: {', '.join(sorted(unknown))} (see --list)")
    if args.share:
        chosen = share(args.share)
    else:
        chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    control = run_tree(None)
    print(f"== control (no mutation): {control.kind.upper()}", flush=True)
    if control.kind != "passed":
        print(control.output[-5000:])
        return 2
    missed = []
    for m in chosen:
        verdict = run_tree(m, shrink=not args.no_shrink)
        print(f"== {m.name}: {verdict.kind.upper()}  ({m.breaks})")
        if verdict.kind == "caught":
            print(counterexample(verdict.output))
        else:
            missed.append(m.name)
            expected = f"expected an assertion matching {m.caught_by!r}"
            print(f"{expected}; failed with: {list(verdict.assertions) or 'no assertion'}")
            if verdict.kind == "wrong":
                print(verdict.output[-3000:])
        print(flush=True)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
