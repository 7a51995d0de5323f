"""The namespace's layout version: which key layout and record format its keys follow.

``<namespace>/layout`` holds ``{"layout": N}``. A namespace without it was written by a
release from before the key existed, whose layout is layout 1 (today's: nothing changed
but the key). A leader writes the key when it finds none, in a fenced transaction that
also compares its absence; a sidecar that finds a layout newer than :data:`LAYOUT`
refuses to lead (and to run) that namespace, since it cannot know what a newer layout's
keys mean. docs/operations.md ("Upgrades and rollback") says when the number changes.
"""

from __future__ import annotations

import json

import attrs

from ._model import dumps
from ._plan import Fence
from ._txn import Compare, Put, Txn

#: The layout this release reads and writes.
LAYOUT = 1
#: The layout of a namespace that has no layout key (written before the key existed).
UNVERSIONED_LAYOUT = 1


class LayoutRefused(Exception):
    """The namespace's layout is newer than this sidecar knows: it must not lead it."""


@attrs.frozen
class Layout:
    """A namespace's layout as read: its number, and whether the key exists."""

    version: int
    stored: bool


def read_layout(value: str | None) -> Layout:
    """The layout a layout key's value says (``None``: no key, a namespace of a release
    from before the key). A value that is not ours is refused (ValueError): guessing could
    let this sidecar rewrite keys it does not understand."""
    if value is None:
        return Layout(UNVERSIONED_LAYOUT, stored=False)
    try:
        obj = json.loads(value)
        version = obj["layout"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"the layout key holds {value[:80]!r}, not {{'layout': N}}") from exc
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"the layout key holds {value[:80]!r}: layout must be an integer >= 1")
    return Layout(version, stored=True)


def check_layout(
    layout: Layout, *, key: str, known: int = LAYOUT, refusal: str = "it will not lead it"
) -> None:
    """Raise :class:`LayoutRefused` (with the one line an operator needs) when the
    namespace's layout is newer than ``known``; ``refusal`` says what is refused."""
    if layout.version > known:
        raise LayoutRefused(
            f"the namespace's layout is {layout.version} ({key}) but this tm-sidecar knows "
            f"layouts up to {known}: {refusal}; upgrade it "
            "(docs/operations.md, 'Upgrades and rollback')"
        )


def layout_value(version: int = LAYOUT) -> str:
    """The value of the layout key."""
    return dumps({"layout": version})


def plan_stamp_layout(key: str, fence: Fence, version: int = LAYOUT) -> Txn:
    """The leader's write of the layout key to a namespace that has none: fenced, and
    only while the key is still absent (a newer leader may have written it meanwhile)."""
    return Txn(
        compare=(fence.compare(), Compare.absent(key)),
        success=(Put(key, layout_value(version)),),
    )
