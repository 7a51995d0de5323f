"""``run_worker``: the one call a worker process needs."""

from __future__ import annotations

import logging
import multiprocessing
import signal

import anyio

from ._client import TaskManager
from ._handlers import CHILD_NAME
from ._worker import Handler
from .protocol import Unavailable

log = logging.getLogger("taskmanager")


def run_worker(
    handler: Handler,
    *,
    concurrency: int = 1,
    queue: str = "default",
    socket_path: str | None = None,
    shutdown_timeout: float = 30.0,
    connect_timeout_s: float = 5.0,
    backend: str = "asyncio",
    pool: str = "thread",
) -> None:
    """Run ``handler`` for the tasks of ``queue`` until SIGTERM or Ctrl-C, then return.

    On the signal, no new task is taken; running ones get ``shutdown_timeout`` seconds
    to finish, and what cannot finish is handed back to be retried. There is no
    ``KeyboardInterrupt`` traceback: the process can simply exit 0. It waits for a
    sidecar that is not up yet. Raises if the sidecar refuses this worker for good:
    :class:`PermissionDenied` at once when this user may not open its socket (or is not
    in its ``--allow-uid``), rather than waiting.

    ``handler`` and ``pool`` as for :meth:`TaskManager.process` (``pool="process"``: a
    plain handler in child processes, killed at a task's timeout: a script that uses it
    calls ``run_worker`` under ``if __name__ == "__main__":``, since each child imports
    it); ``backend`` is anyio's (``asyncio`` or ``trio``).
    """

    if multiprocessing.current_process().name == CHILD_NAME:
        # A process-pool child imports the script its handler lives in: unguarded, the
        # script would start a worker in every child.
        raise RuntimeError(
            "run_worker() was called in one of its own pool='process' children: put it "
            'under `if __name__ == "__main__":` in your script'
        )

    async def main() -> None:
        # Signals are taken from the start: a Ctrl-C while connecting is graceful too.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with TaskManager(socket_path, connect_timeout_s=connect_timeout_s) as manager:
                signalled = False
                async with anyio.create_task_group() as tg:

                    async def stop_waiting() -> None:
                        nonlocal signalled
                        async for _ in signals:
                            signalled = True
                            break
                        tg.cancel_scope.cancel()

                    tg.start_soon(stop_waiting)
                    while True:
                        try:
                            await manager.process(
                                handler, concurrency=concurrency, queue=queue, pool=pool
                            )
                            break
                        except Unavailable as exc:
                            log.warning("%s; still trying", exc)
                    tg.cancel_scope.cancel()
                if signalled:
                    return  # stopped before the worker could start (leaving shuts down)
                log.info("worker for queue %r running (concurrency %d)", queue, concurrency)
                await manager._serve_until(signals, shutdown_timeout)

    try:
        anyio.run(main, backend=backend)
    except BaseExceptionGroup as group:
        # One error out of the task groups (a PermissionDenied, say) is raised as itself,
        # so that ``except PermissionDenied`` works around run_worker().
        sole: BaseException = group
        while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
            sole = sole.exceptions[0]
        if sole is group:
            raise
        raise sole from None
