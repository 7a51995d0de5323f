"""The tools the suite needs from the machine (node, npm, jq, chromium...).

Outside CI a missing tool skips the tests that need it, with the package to install.
In CI it fails them: ``.ci/run`` installs every tool, so a missing one is a broken CI
machine, not a reason to pass with less tested. "In CI" is ``TM_REQUIRE_TOOLS=1`` (which
``.ci/run`` sets) or ``CI`` set to anything at all: CI services spell it ``true``,
``True``, ``1`` or ``yes``.
"""

from __future__ import annotations

import os
import shutil

import pytest


def tools_required() -> bool:
    """Whether a missing tool fails the run rather than skipping its tests."""
    return os.environ.get("TM_REQUIRE_TOOLS") == "1" or bool(os.environ.get("CI"))


def require(*names: str, package: str) -> list[str]:
    """The paths of ``names`` on PATH; a missing one fails (in CI) or skips the test,
    naming Debian's ``package``."""
    paths = [shutil.which(name) for name in names]
    missing = [name for name, path in zip(names, paths, strict=True) if path is None]
    if missing:
        what = f"{', '.join(missing)} not installed (apt-get install {package})"
        if tools_required():
            pytest.fail(f"{what}, and this is CI: .ci/run installs it")
        pytest.skip(what)
    return [path for path in paths if path is not None]
