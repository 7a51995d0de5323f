"""``python -m bench.peer_enqueue huey|celery N``: enqueue N no-op tasks with a peer and
print how long that took (imported by module name, so that the workers know the task)."""

from __future__ import annotations

import sys
import time


def main(peer: str, n: int) -> float:
    """Enqueue ``n`` tasks with ``peer``; answers the seconds it took."""
    if peer == "huey":
        from bench.peer_huey import noop as huey_noop

        started = time.monotonic()
        for _ in range(n):
            huey_noop()
    else:
        from bench.peer_celery import noop as celery_noop

        started = time.monotonic()
        for _ in range(n):
            celery_noop.delay()
    return time.monotonic() - started


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2])))
