"""Plain handlers for ``pool="process"`` tests: module-level, so that a child process
(started with ``spawn``) can import them. Each writes what it did to the file its task's
payload names, one JSON line per event, since a child shares no memory with the test."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from taskmanager import Permanent, Snooze


def _note(path: str, **fields: Any) -> None:
    with open(path, "a") as out:
        out.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def hangs_first(task: Any) -> Any:
    """Attempt 1 never ends by itself (a hard limit must end it); later ones answer."""
    _note(task.data["log"], attempt=task.attempt, event="start")
    if task.attempt == 1:
        time.sleep(3600)
    task.update({"attempt": task.attempt})
    return {"attempt": task.attempt, "pid": os.getpid()}


def steers(task: Any) -> Any:
    """Snoozes once, then fails for good (Permanent), as the payload asks."""
    _note(task.data["log"], attempt=task.attempt, event="start")
    if task.data.get("snooze") and not os.path.exists(task.data["log"] + ".snoozed"):
        open(task.data["log"] + ".snoozed", "w").close()
        raise Snooze(0)
    raise Permanent("asked to fail")
