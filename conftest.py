"""Hypothesis profiles for the whole suite: ``default`` runs in CI; ``thorough`` is longer
(``pytest proptests --hypothesis-profile=thorough``)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

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
settings.register_profile(
    "mutation",
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile("default")
