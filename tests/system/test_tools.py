"""A tool the suite needs fails the run in CI, whatever CI's value, and skips outside it."""

from __future__ import annotations

import pytest

from tests.tools import require

MISSING = "tm-no-such-tool-anywhere"


@pytest.mark.parametrize(
    "env",
    [{"CI": "true"}, {"CI": "1"}, {"CI": "True"}, {"CI": "yes"}, {"TM_REQUIRE_TOOLS": "1"}],
)
def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TM_REQUIRE_TOOLS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} not installed"):
        require(MISSING, package="tm-tools")


def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TM_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install tm-tools"):
        require(MISSING, package="tm-tools")


def test_a_present_tool_answers_its_path() -> None:
    [sh] = require("sh", package="dash")
    assert sh.endswith("/sh")


def test_ci_requires_every_tool() -> None:
    """.ci/run says it is CI in a way no value of CI can undo."""
    from tests.procs import ROOT

    script = (ROOT / ".ci" / "run").read_text()
    assert "export TM_REQUIRE_TOOLS=1" in script
