"""The mutation check as a test (slow: about four minutes): ``pytest -m slow proptests``."""

from __future__ import annotations

import pytest

from proptests.mutations import MUTATIONS, run_mutation


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_the_state_machine_catches_the_bug(mutation: object) -> None:
    caught, output = run_mutation(mutation)  # type: ignore[arg-type]
    assert caught, output[-3000:]
