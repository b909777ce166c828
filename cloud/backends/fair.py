"""FairGate: at most ``width`` calls out at once; waiting callers are let in fairly.

The Ray backend keeps its queue here, in the worker, and sends Ray only what the replicas
can take at once: so when the replicas are the bottleneck, the order in which requests
reach them is ours, with the batcher's rules (cloud/batcher.py): (model, cut) keys take
turns, and inside a key the clients (credential, else connection) take turns.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

__all__ = ["FairGate"]


class FairGate:
    def __init__(self, width: int) -> None:
        self.width = max(1, width)
        self.busy = 0
        self._waiting: OrderedDict[object, OrderedDict[str, deque[asyncio.Future]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(q) for clients in self._waiting.values() for q in clients.values())

    async def acquire(self, key: object, client: str) -> None:
        """Return once this caller may send; cancel-safe (a cancelled waiter leaves no trace)."""
        if self.busy < self.width and not self._waiting:
            self.busy += 1
            return
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, OrderedDict()).setdefault(client, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # let in, but the caller went away: pass it on
                self.release()
            else:
                self._forget(key, client, fut)
            raise

    def release(self) -> None:
        self.busy -= 1
        while self.busy < self.width and self._waiting:
            key, clients = next(iter(self._waiting.items()))
            client, queue = next(iter(clients.items()))
            fut = queue.popleft()
            if queue:
                clients.move_to_end(client)  # this client's next call waits for the others
            else:
                del clients[client]
            if clients:
                self._waiting.move_to_end(key)  # and this key's for the other keys
            else:
                del self._waiting[key]
            if not fut.done():
                fut.set_result(None)
                self.busy += 1

    def _forget(self, key: object, client: str, fut: asyncio.Future) -> None:
        clients = self._waiting.get(key)
        queue = clients.get(client) if clients else None
        if queue is None or clients is None:
            return
        try:
            queue.remove(fut)
        except ValueError:
            return
        if not queue:
            del clients[client]
        if not clients:
            del self._waiting[key]
