"""The namespace's layout version in etcd: read and checked before a sidecar joins a
namespace, checked again and written (when absent) as each term begins."""

from __future__ import annotations

import logging

from ..core import (
    Fence,
    Keyspace,
    Layout,
    LayoutRefused,
    check_layout,
    plan_stamp_layout,
    read_layout,
)
from ..etcd import Etcd, retrying

log = logging.getLogger("tm_sidecar.leader")


async def namespace_layout(etcd: Etcd, ks: Keyspace) -> Layout:
    """The namespace's layout, refused (:class:`LayoutRefused`) when this sidecar does
    not know it: newer than it knows, or not a layout value at all."""
    kv = await retrying(lambda: etcd.get(ks.layout()), what="read the layout version")
    try:
        layout = read_layout(None if kv is None else kv.value)
    except ValueError as exc:
        raise LayoutRefused(f"{ks.layout()}: {exc}: this tm-sidecar will not lead it") from exc
    check_layout(layout, key=ks.layout())
    return layout


async def stamp_layout(etcd: Etcd, ks: Keyspace, fence: Fence) -> Layout:
    """Check the layout as a term begins, and write it in a namespace of an older
    release that has none (fenced, and only while still absent: if a newer leader wrote
    one meanwhile, it is read and checked again)."""
    layout = await namespace_layout(etcd, ks)
    if layout.stored:
        return layout
    result = await retrying(
        lambda: etcd.txn(plan_stamp_layout(ks.layout(), fence)), what="write the layout version"
    )
    if result.succeeded:
        log.info("layout version written", extra={"key": ks.layout(), "layout": layout.version})
        return Layout(layout.version, stored=True)
    return await namespace_layout(etcd, ks)
