"""Fault injection for the resume tests: kill the process at a chosen moment.

``FLIPVQA_CRASH_AT="event:n[,event:n]"`` makes the n-th occurrence (1-based) of ``event`` send
SIGKILL to this process, as a pre-empted job would die: no handler runs, nothing is flushed;
``event:n:TERM`` sends SIGTERM instead (what SLURM sends before it kills).
Events: ``micro_batch`` (after a batch's backward, before the optimizer step), ``validation``
(after a validation batch), ``write`` (an atomic write, after the data is on disk, before the rename).
Unset (always, outside tests), this does nothing but count.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(event: str) -> None:
    plan = os.environ.get("FLIPVQA_CRASH_AT")
    if not plan:
        return
    _seen[event] = _seen.get(event, 0) + 1
    for item in plan.split(","):
        name, count, *how = item.split(":")
        if name == event and count.isdigit() and int(count) == _seen[event]:
            os.kill(os.getpid(), signal.SIGTERM if how == ["TERM"] else signal.SIGKILL)
