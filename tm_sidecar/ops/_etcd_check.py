"""What a sidecar checks of the etcd it uses, once etcd answers: the server's version
(a warning naming the version to run when it has known data-loss bugs: see
``core/_versions.py``) and whether it is another sidecar's embedded etcd (a single node
that stops with that sidecar: a sidecar pointed at it says so in its log).

The embedded etcd is marked by the sidecar that starts it: ``<root>.embedded``, outside
every namespace, holds that sidecar's host, pid and data directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import attrs
import trio

from .._errors import TaskManagerError
from ..core import Keyspace, etcd_version_warning
from ..etcd import Etcd, EtcdConfig, connect, retrying

log = logging.getLogger("tm_sidecar")

#: What the log says of a sidecar whose etcd is another sidecar's embedded one.
BORROWED = (
    "this sidecar's etcd is another sidecar's embedded etcd: a single node that stops "
    "with that sidecar (every create and every assignment stop with it); for a cluster, "
    "run three etcd members of their own and point every sidecar at all three "
    "(docs/operations.md, 'A real cluster')"
)


@attrs.frozen
class EtcdFacts:
    """What the checks found."""

    version: str
    warning: str | None
    #: The sidecar whose embedded etcd this is (its mark), when it is not this one's.
    borrowed_from: dict[str, object] | None = None


async def mark_embedded(etcd: Etcd, ks: Keyspace, data_dir: str) -> None:
    """Mark the etcd this sidecar just started as its embedded one."""
    mark = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "data_dir": data_dir,
        "started_at": time.time(),
    }
    await retrying(lambda: etcd.put(ks.embedded_mark(), json.dumps(mark)), what="mark etcd")


async def check_etcd(etcd: Etcd, ks: Keyspace, *, embedded_here: bool) -> EtcdFacts:
    """Read etcd's version (waiting for etcd to answer) and its mark; log a warning for a
    version with known data-loss bugs, and for another sidecar's embedded etcd."""
    status = await retrying(etcd.status, what="read etcd's version")
    version = str(status.get("version") or "unknown")
    warning = etcd_version_warning(version)
    if warning is not None:
        log.warning(
            "etcd's version has known data-loss bugs",
            extra={"etcd_version": version, "advice": warning},
        )
    else:
        log.info("etcd version", extra={"etcd_version": version})
    borrowed: dict[str, object] | None = None
    if not embedded_here:
        try:
            kv = await etcd.get(ks.embedded_mark())
        except TaskManagerError as exc:  # a prefix-only role may not read it: no mark
            log.debug("embedded mark not read", extra={"error": str(exc)})
            kv = None
        if kv is not None:
            try:
                borrowed = dict(json.loads(kv.value))
            except (ValueError, TypeError):
                borrowed = {}
            log.warning(
                BORROWED,
                extra={
                    "embedded_of_host": borrowed.get("host", "?"),
                    "embedded_of_pid": borrowed.get("pid", "?"),
                    "embedded_data_dir": borrowed.get("data_dir", "?"),
                },
            )
    return EtcdFacts(version, warning, borrowed)


async def check_members(cfg: EtcdConfig, etcd: Etcd) -> dict[str, str]:
    """Every member's version, by client URL (a rolling upgrade mixes them; the client
    talks to one member at a time): each member with known data-loss bugs is logged
    like the one this sidecar talks to. A member that does not answer is skipped."""
    versions: dict[str, str] = {}
    for url in await etcd.member_urls():
        member = connect(attrs.evolve(cfg, endpoints=(url,), timeout_s=min(cfg.timeout_s, 2.0)))
        try:
            with trio.move_on_after(5.0):
                versions[url] = str((await member.status()).get("version") or "unknown")
        except TaskManagerError as exc:
            log.debug("etcd member not checked", extra={"member": url, "error": str(exc)})
        finally:
            await member.aclose()
    for url, version in versions.items():
        warning = etcd_version_warning(version)
        if warning is not None:
            log.warning(
                "an etcd member's version has known data-loss bugs",
                extra={"member": url, "etcd_version": version, "advice": warning},
            )
    return versions


async def check_at_start(
    cfg: EtcdConfig, etcd: Etcd, ks: Keyspace, data_dir: str, embedded: bool
) -> None:
    """The sidecar's checks once etcd answers: mark its embedded etcd as its own, then
    :func:`check_etcd` and, for a cluster, :func:`check_members`. A refusal (a role
    without the right) is logged, not fatal."""
    try:
        if embedded:
            await mark_embedded(etcd, ks, data_dir)
        await check_etcd(etcd, ks, embedded_here=embedded)
        if not embedded:
            await check_members(cfg, etcd)
    except TaskManagerError as exc:
        log.warning("etcd's version not checked", extra={"error": str(exc)})
