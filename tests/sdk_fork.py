"""A producer that forks after making its BlockingTaskManager (gunicorn --preload style).

``python tests/sdk_fork.py used`` commits a task before the fork, ``fresh`` does not;
then the child and the parent each commit one and print its result.
"""

from __future__ import annotations

import os
import signal
import sys

from taskmanager import BlockingTaskManager

tm = BlockingTaskManager()  # at import time, as in a preloaded web app


def run(who: str) -> None:
    result = tm.create({"who": who}).commit().result(timeout=20)
    print(f"{who} {result['node']}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "used":
        run("parent-before")
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a child that hangs must not outlive the test
        try:
            run("child")
            tm.close()
        except BaseException as exc:
            print(f"child failed: {exc!r}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    run("parent-after")
    sys.exit(os.waitstatus_to_exitcode(status))
