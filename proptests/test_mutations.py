"""The mutation check as tests: a share of the mutations in every run (a different share
each day, so that a few days of CI cover them all), every one under ``pytest -m slow
proptests`` (about ten minutes) or ``python -m proptests.mutations``."""

from __future__ import annotations

import datetime

import pytest

from proptests.mutations import MUTATIONS, Mutation, run_tree, share

#: Mutations judged in every run of the suite, after the control.
SHARE = 3


def test_the_control_passes() -> None:
    """The unmutated tree passes under the mutation check's own (derandomized) profile:
    otherwise no verdict below means anything."""
    verdict = run_tree(None, shrink=False)
    assert verdict.kind == "passed", verdict.output[-3000:]


@pytest.mark.parametrize("mutation", share(SHARE), ids=lambda m: m.name)
def test_todays_share_is_caught_by_the_property_it_breaks(mutation: Mutation) -> None:
    verdict = run_tree(mutation, shrink=False)
    assert verdict.kind == "caught", (
        f"{verdict.kind}: expected an assertion matching {mutation.caught_by!r}, "
        f"got {list(verdict.assertions)}\n{verdict.output[-3000:]}"
    )


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_still_finds_its_line(mutation: Mutation) -> None:
    """A change to the code a mutation plants its bug in must move the mutation too:
    otherwise the day its share comes round, it cannot be planted."""
    from proptests.mutations import ROOT

    assert (ROOT / mutation.path).read_text().count(mutation.old) == 1, mutation.old


def test_the_shares_cover_every_mutation_within_a_few_days() -> None:
    days = -(-len(MUTATIONS) // SHARE)
    start = datetime.date(2026, 1, 1)
    seen = {m.name for d in range(days) for m in share(SHARE, start + datetime.timedelta(days=d))}
    assert seen == {m.name for m in MUTATIONS}


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_the_state_machine_catches_the_bug(mutation: Mutation) -> None:
    verdict = run_tree(mutation)
    assert verdict.kind == "caught", (
        f"{verdict.kind}: expected an assertion matching {mutation.caught_by!r}, "
        f"got {list(verdict.assertions)}\n{verdict.output[-3000:]}"
    )


def test_the_readme_counts_the_mutations() -> None:
    from proptests.mutations import ROOT

    readme = (ROOT / "README.md").read_text()
    assert f"plant {len(MUTATIONS)} known bugs" in readme
