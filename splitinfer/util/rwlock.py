"""A process-wide shared/exclusive lock between running models and tracing them.

torch.fx's tracer patches ``torch.nn.Module.__call__`` for the whole process while it
runs, so a model called on another thread during a trace fails (``NameError: module is
not installed as a submodule``) — a worker profiling or loading a new version while it
serves, or several edge agents in one process. Model runs take the lock shared (they
run side by side); a trace takes it exclusive (it waits for the runs in flight, and new
runs wait for it). A thread that holds it exclusive may also run models (re-entrant).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SharedExclusiveLock", "MODEL_LOCK"]


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._owner: int | None = None  # thread holding it exclusive
        self._depth = 0  # re-entries of the owner
        self._waiting = 0  # exclusive requests waiting (they keep new shared holders out)

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                try:
                    while self._owner is not None or self._shared:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                self._cond.notify_all()


# The one lock of this process between model runs and traces.
MODEL_LOCK = SharedExclusiveLock()
