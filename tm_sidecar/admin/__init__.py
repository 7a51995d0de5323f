"""Looking at and repairing a namespace straight from etcd, with no sidecar: the reads
and repairs that ``tmctl`` and the web dashboard share (the commands' output is
``ops/_tmctl.py``'s; the pages are ``web/``'s).

May import: core, etcd, leader, node.
"""

from ._queries import QUEUE_STATES, Queries
from ._repairs import cancel_record, purge_records, retake_guard, retry_failed

__all__ = [
    "QUEUE_STATES",
    "Queries",
    "cancel_record",
    "purge_records",
    "retake_guard",
    "retry_failed",
]
