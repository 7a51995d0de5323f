"""The queue state machine on the in-memory etcd: fast, many examples.

The in-memory etcd is checked against the real one by test_fake_vs_etcd.py.
"""

from __future__ import annotations

from hypothesis import settings

from proptests.backends import Backend, MemoryEtcd
from proptests.machine import QueueMachine


class CoreQueue(QueueMachine):
    def make_backend(self) -> Backend:
        return MemoryEtcd()


TestCoreQueue = CoreQueue.TestCase
TestCoreQueue.settings = settings(settings.default)
