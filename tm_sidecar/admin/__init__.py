"""Looking at and repairing a namespace straight from etcd, with no sidecar: the reads
and repairs that ``tmctl`` and the web dashboard share (the commands' output is
``ops/_tmctl.py``'s; the pages are ``web/``'s).

May import: core, etcd, leader, node.
"""

from ._bulk import (
    REPAIR_STATES,
    Progress,
    RepairFilter,
    count_matching,
    matching_pages,
    repair_matching,
)
from ._queries import QUEUE_STATES, Queries
from ._repairs import cancel_record, purge_records, retake_guard, retry_failed
from ._schedules import ScheduleRun, run_schedule_now

__all__ = [
    "QUEUE_STATES",
    "REPAIR_STATES",
    "Progress",
    "Queries",
    "RepairFilter",
    "ScheduleRun",
    "cancel_record",
    "count_matching",
    "matching_pages",
    "purge_records",
    "repair_matching",
    "retake_guard",
    "retry_failed",
    "run_schedule_now",
]
