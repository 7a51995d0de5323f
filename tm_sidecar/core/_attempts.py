"""The node agent's one decision about its assignments: start this attempt now or not.

An attempt is one incarnation of a task's processing key, named by the task and that
key's create revision (the leader creates many keys in one transaction, so the revision
alone does not name it). The watch may deliver an attempt's key more than once: its own
rewrites (``started_at``, progress) arrive after the attempt may already have finished
here, a resumed watch may repeat events, and a re-list shows every live key again.
Whatever it delivers, a node starts each attempt at most once.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from ._keys import TaskId


@attrs.define(eq=False)
class AttemptLedger:
    """The attempts this node has started, running or over.

    Remembering every attempt would grow without bound, so past ``max_remembered`` the
    oldest are forgotten and a floor takes their place: an attempt created at or below
    the floor is never started. :meth:`settle` forgets, and only between deliveries:
    the agent takes in each watch response (or listing) whole, in revision order, so by
    then every attempt created at or below the last revision it took in has been
    considered already, and anything at or below the floor is a repeat.
    """

    max_remembered: int = 65_536
    # (task, create revision) -> True while the attempt runs here, False once it is over
    _attempts: OrderedDict[tuple[TaskId, int], bool] = attrs.Factory(OrderedDict)
    _floor: int = 0

    def begin(self, task_id: TaskId, create_revision: int) -> bool:
        """Whether to start this attempt now: true once per attempt, ever."""
        key = (task_id, create_revision)
        if create_revision <= self._floor or key in self._attempts:
            return False
        self._attempts[key] = True
        return True

    def end(self, task_id: TaskId, create_revision: int) -> None:
        """The attempt is over here. It stays remembered, so that a late or repeated
        delivery of its key does not start it again."""
        key = (task_id, create_revision)
        if key in self._attempts:
            self._attempts[key] = False

    def running(self, task_id: TaskId, create_revision: int) -> bool:
        """Whether the attempt is running here now."""
        return self._attempts.get((task_id, create_revision), False)

    def settle(self) -> None:
        """A delivery has been taken in whole: forget the oldest attempts past the bound."""
        while len(self._attempts) > self.max_remembered:
            (_, revision), _ = self._attempts.popitem(last=False)
            self._floor = max(self._floor, revision)
