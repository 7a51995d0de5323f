"""Hypothesis profiles for the whole suite: ``default`` runs in CI; ``thorough`` is longer
(``pytest proptests --hypothesis-profile=thorough``)."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

# Every process a test starts dies with the run, even a run that is killed.
pytest_plugins = ["tests.reaper"]

settings.register_profile(
    "default",
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The mutation check's: derandomized, so that a mutant's verdict is the same in every
# run of the same tree (a bug caught once is caught always; one missed is missed always,
# and gets an explicit program in proptests/test_core_machine.py).
settings.register_profile(
    "mutation",
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    derandomize=True,
)
# The same without shrinking: a verdict in a fraction of the time, for the suite's share
# (shrinking keeps the failure's kind and place, so the verdict is the same).
settings.register_profile(
    "mutation-quick",
    settings.get_profile("mutation"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile("default")
