"""The queue state machine against a real etcd, plus compaction and re-listing.

Fewer examples than the in-memory run (each step is a few etcd round trips); the
``thorough`` profile runs ten times more.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis.stateful import rule

from proptests.backends import Backend
from proptests.machine import QueueMachine
from tm_sidecar._errors import Compacted
from tm_sidecar.core import LeaderView, Range
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import EtcdProcess


class EtcdQueue(QueueMachine):
    endpoint = ""

    def make_backend(self) -> Backend:
        return SyncEtcd(self.endpoint)

    @rule()
    def compact_and_relist(self) -> None:
        """History is compacted under the leader; a watch from before it is refused, and
        the leader rebuilds its view from a fresh listing (claims and all)."""
        db = self.db
        assert isinstance(db, SyncEtcd)
        old = self.view.revision if self.view is not None else 1
        current = db.revision()
        db.compact(current)
        if old < current:
            with pytest.raises(Compacted, match="compacted"):
                db.range(Range(self.ks.prefix, prefix=True, revision=old))
        kvs, revision = db.list(self.ks.prefix)
        self.view = LeaderView.from_listing(self.ks, kvs, revision)
        self.listing = {kv.key: kv for kv in kvs}


@pytest.fixture(autouse=True, scope="module")
def _endpoint(prop_etcd: EtcdProcess) -> None:
    EtcdQueue.endpoint = prop_etcd.endpoint


_profile = settings.default
assert _profile is not None
TestEtcdQueue = EtcdQueue.TestCase
TestEtcdQueue.settings = settings(_profile, max_examples=max(10, _profile.max_examples // 8))
