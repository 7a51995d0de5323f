"""What tm-sidecar knows of etcd's versions: which have known data-loss bugs, and what
to run instead; and the key an embedded etcd marks itself with.

etcd 3.5.0 to 3.5.2 can lose committed transactions after a crash under load (etcd's
data-inconsistency advisory of March 2022, fixed in 3.5.3; 3.5.6 is the version etcd
recommends for production). The 3.4 line before 3.4.22 has the lease and revision bugs
fixed there (and 3.4 reached its end of life). Older lines are not supported.
"""

from __future__ import annotations

import re

#: What to run: the 3.5 line from this version on.
RECOMMENDED_ETCD = "3.5.6"
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def parse_version(version: str) -> tuple[int, int, int] | None:
    """``3.5.1`` (or ``v3.5.1``, ``3.5.1-rc.0``) as (3, 5, 1); None if it is not one."""
    match = _VERSION.match(version.strip())
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def etcd_version_warning(version: str) -> str | None:
    """A sentence for an etcd ``version`` with known data-loss bugs, naming the version
    to run; None for a good one (or one that cannot be read: nothing is known of it)."""
    parsed = parse_version(version)
    if parsed is None:
        return None
    run = f"run etcd {RECOMMENDED_ETCD} or later"
    if (3, 5, 0) <= parsed <= (3, 5, 2):
        return (
            f"etcd {version} can lose committed writes after a crash under load (3.5.0 to "
            f"3.5.2; fixed in 3.5.3): {run}"
        )
    if (3, 4, 0) <= parsed < (3, 4, 22):
        return (
            f"etcd {version} has known data-loss bugs fixed in 3.4.22 (and the 3.4 line has "
            f"reached its end of life): {run} (or 3.4.22 at least)"
        )
    if parsed < (3, 4, 0):
        return f"etcd {version} is older than any version tm-sidecar supports: {run}"
    return None
