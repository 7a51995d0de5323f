"""The dashboard's templates (``templates/``) and the filters they use to show times,
durations, sizes and JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jinja2
from starlette.templating import Jinja2Templates

from ._data import pretty

HERE = Path(__file__).parent


def page_templates(clock: Callable[[], float]) -> Jinja2Templates:
    """The pages' templates, with their filters (``ago`` reads ``clock``)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = when
    env.filters["ago"] = lambda t: ago(t, clock())
    env.filters["size"] = size
    env.filters["pretty"] = pretty
    env.filters["duration"] = duration
    env.filters["fromjson"] = json.loads
    return Jinja2Templates(env=env)


def when(epoch: float | None) -> str:
    """An epoch time in UTC, to the millisecond."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def ago(epoch: float | None, now: float) -> str:
    """How long before (or after) ``now``."""
    if epoch is None:
        return "-"
    delta = now - epoch
    suffix = "ago" if delta >= 0 else "from now"
    return f"{duration(abs(delta))} {suffix}"


def duration(seconds: float | None) -> str:
    """Seconds in the unit that reads best."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size(n: int) -> str:
    """Bytes in the unit that reads best."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
