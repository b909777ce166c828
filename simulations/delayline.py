"""A delay line of our own: one-way delay and random loss between network namespaces.

This kernel has ``tc tbf`` but no ``netem``, so delay and loss come from here. It is a
**TUN-based** element: :class:`splitinfer.simulations.netns.NetnsLab` (``delay_line=True``)
puts a third, "router" namespace between the edge and the cloud, with one TUN device per
direction; policy routing sends every packet that enters the router from the edge side
into ``tun-up`` and every packet from the cloud side into ``tun-down``. This process
(run inside the router namespace) reads each packet from a TUN device, holds it for that
direction's one-way delay (or drops it with probability ``loss``), and writes it back into
the same device, from where the kernel routes it on to the other side::

    edge ns           router ns                                  cloud ns
    [edge if]─tbf─►[r-edge]─► tun-up ─► (this process: hold d_up, drop p) ─► tun-up ─►[r-cloud]──►[cloud if]
    [edge if]◄─────[r-edge]◄─ tun-down ◄─ (hold d_down, drop p) ◄─ tun-down ◄─[r-cloud]◄─tbf─[cloud if]

Whole IP packets are delayed, so TCP sees a real RTT (its handshake, slow start, ACK
clock and retransmissions included), for any protocol. Bandwidth stays with ``tc tbf``.

Limits (say them when reporting results):

- FIFO per direction: a packet never overtakes an earlier one, also when the delay is
  changed live (a shorter delay applies once the queue ahead has left): no reordering.
- Timer granularity ~1 ms (asyncio's event loop on epoll): each packet is held its
  delay within about +-0.5 ms (more when the machine is busy); the two hops through
  the router add ~0.1-0.5 ms per direction of their own.
- Loss is independent per packet (Bernoulli), in each direction, seeded; no bursts.
- Python handles every packet: fine for 3G/4G rates (a few thousand packets/s); above
  ~50-100 Mbit/s the process itself becomes the bottleneck and adds delay.
- No queue limit of its own (the tbf in front of it holds the bottleneck queue).

The core (:class:`DelayLine`) works on any datagram file descriptor, so it is tested
without root on a socket pair. ``python -m splitinfer.simulations.delayline --tun
NAME=DELAY_MS[:LOSS] ...`` attaches to existing TUN devices and serves a line protocol on
stdin: ``set NAME DELAY_MS LOSS``, ``stats``, ``quit`` (EOF on stdin also quits, so the
element never outlives its parent); it answers ``ready`` and one JSON line per ``stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from splitinfer.util.procs import LinePump, python_module

log = logging.getLogger(__name__)

__all__ = ["DelayLine", "DelayLineProcess", "Direction", "open_tun"]

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65_535
EARLY_S = 0.0005  # the event loop wakes up to ~1 ms late (epoll's ms timeout): aim half of that early
ELEMENT = "tun delay line (splitinfer.simulations.delayline)"  # how results name this element


def open_tun(name: str) -> int:
    """Attach to TUN device `name` (in this process's network namespace; created if absent,
    e.g. by ``ip tuntap add NAME mode tun``). Returns a non-blocking fd: one packet per read."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Direction:
    """One direction: packets read from `fd` are written back to `fd` after `delay_s`."""

    name: str
    fd: int
    delay_s: float = 0.0
    loss: float = 0.0
    received: int = 0
    dropped: int = 0  # by the loss model
    sent: int = 0
    write_errors: int = 0
    bytes: int = 0
    held_s_sum: float = 0.0  # how long the sent packets were actually held
    late_s_max: float = 0.0  # worst lateness against the due time (timer granularity)
    queue: deque = field(default_factory=deque)  # (due, read at, packet), FIFO
    handle: asyncio.TimerHandle | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "delay_ms": round(self.delay_s * 1e3, 3), "loss": self.loss, "received": self.received,
            "dropped": self.dropped, "sent": self.sent, "write_errors": self.write_errors, "bytes": self.bytes,
            "queued": len(self.queue),
            "mean_held_ms": round(self.held_s_sum / self.sent * 1e3, 3) if self.sent else None,
            "max_late_ms": round(self.late_s_max * 1e3, 3),
        }  # fmt: skip


class DelayLine:
    """Holds each packet of each direction for its delay, drops some; see the module docstring."""

    def __init__(self, directions: Sequence[Direction], seed: int = 0) -> None:
        self.directions = {d.name: d for d in directions}
        self.rng = random.Random(seed)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start serving on the running event loop."""
        self.loop = asyncio.get_running_loop()
        for d in self.directions.values():
            self.loop.add_reader(d.fd, self._readable, d)

    def stop(self) -> None:
        if self.loop is None:
            return
        for d in self.directions.values():
            self.loop.remove_reader(d.fd)
            if d.handle is not None:
                d.handle.cancel()
                d.handle = None

    def set(self, name: str, delay_ms: float | None = None, loss: float | None = None) -> None:
        """Change a direction's delay and/or loss live (applies to packets read from now on)."""
        d = self.directions[name]
        if delay_ms is not None:
            if not delay_ms >= 0:
                raise ValueError(f"delay must be >= 0 ms, got {delay_ms}")
            d.delay_s = delay_ms / 1e3
        if loss is not None:
            if not 0.0 <= loss <= 1.0:
                raise ValueError(f"loss must be in [0, 1], got {loss}")
            d.loss = loss

    def stats(self) -> dict[str, Any]:
        return {name: d.stats() for name, d in self.directions.items()}

    def _readable(self, d: Direction) -> None:
        assert self.loop is not None
        now = self.loop.time()
        for _ in range(256):  # bounded per callback, so one busy direction cannot starve the other
            try:
                pkt = os.read(d.fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("delay line %s: read failed: %s", d.name, exc)
                break
            d.received += 1
            if d.loss > 0.0 and self.rng.random() < d.loss:
                d.dropped += 1
                continue
            due = now + d.delay_s
            if d.queue and d.queue[-1][0] > due:  # FIFO: never overtake (delay lowered live)
                due = d.queue[-1][0]
            d.queue.append((due, now, pkt))
        self._arm(d)

    def _arm(self, d: Direction) -> None:
        if d.handle is None and d.queue:
            assert self.loop is not None
            d.handle = self.loop.call_at(d.queue[0][0] - EARLY_S, self._flush, d)

    def _flush(self, d: Direction) -> None:
        assert self.loop is not None
        d.handle = None
        now = self.loop.time()
        q = d.queue
        while q and q[0][0] <= now + EARLY_S:
            due, read_at, pkt = q.popleft()
            try:
                os.write(d.fd, pkt)
            except OSError:
                d.write_errors += 1
                continue
            d.sent += 1
            d.bytes += len(pkt)
            d.held_s_sum += now - read_at
            if now - due > d.late_s_max:
                d.late_s_max = now - due
        self._arm(d)


# ------------------------------------------------------------------------ the process
def _parse_spec(spec: str) -> tuple[str, float, float]:
    """NAME=DELAY_MS[:LOSS]"""
    name, _, rest = spec.partition("=")
    delay, _, loss = rest.partition(":")
    if not name or not delay:
        raise argparse.ArgumentTypeError(f"bad --tun {spec!r}: use NAME=DELAY_MS[:LOSS]")
    return name, float(delay), float(loss or 0.0)


async def _serve(specs: list[tuple[str, float, float]], seed: int) -> None:
    directions = []
    for name, delay_ms, loss in specs:
        directions.append(Direction(name=name, fd=open_tun(name), delay_s=delay_ms / 1e3, loss=loss))
    line = DelayLine(directions, seed)
    line.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    say("ready")

    async def commands() -> None:
        while True:
            raw = await reader.readline()
            if not raw:  # the parent is gone
                break
            words = raw.decode().split()
            if not words:
                continue
            try:
                if words[0] == "set" and len(words) == 4:
                    line.set(words[1], float(words[2]), float(words[3]))
                    say("ok")
                elif words[0] == "stats":
                    say(json.dumps(line.stats()))
                elif words[0] == "quit":
                    break
                else:
                    say(f"error unknown command {raw.decode().strip()!r}")
            except (KeyError, ValueError) as exc:
                say(f"error {exc}")
        stop.set()

    task = asyncio.create_task(commands())
    await stop.wait()
    task.cancel()
    line.stop()
    say(json.dumps(line.stats()))
    for d in directions:
        os.close(d.fd)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.simulations.delayline", description=__doc__.split("\n")[0])
    parser.add_argument("--tun", action="append", type=_parse_spec, required=True, help="NAME=DELAY_MS[:LOSS], repeatable")
    parser.add_argument("--seed", type=int, default=0, help="seed of the loss model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args.tun, args.seed))


# ------------------------------------------------------------------ its parent's handle
class DelayLineProcess:
    """The delay line as a child process (e.g. under ``ip netns exec ROUTER``).

    ``tuns`` maps a TUN device name to (delay_ms, loss)."""

    def __init__(self, tuns: dict[str, tuple[float, float]], *, prefix: Sequence[str] = (), seed: int = 0,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        args = ["--seed", str(seed)]
        for name, (delay_ms, loss) in tuns.items():
            args += ["--tun", f"{name}={delay_ms:g}:{loss:g}"]
        cmd = [*prefix, *python_module("splitinfer.simulations.delayline", *args)]
        self.settings = {name: (float(d), float(p)) for name, (d, p) in tuns.items()}
        self.final_stats: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._err = LinePump(self.proc.stderr)
        self._out, self._lines = LinePump.to_queue(self.proc.stdout)
        first = self._read_line(timeout_s)
        if first != "ready":
            self.kill()
            raise RuntimeError(f"the delay line did not start: {first or ''} {self._err.last()}")

    def _read_line(self, timeout_s: float = 10.0) -> str | None:
        """The next answer line (None: the process ended or did not answer in time)."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return None if line is None else line.strip()

    def _ask(self, command: str) -> str | None:
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None:
                raise RuntimeError("the delay line is not running")
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return self._read_line()

    def set(self, name: str, delay_ms: float, loss: float) -> None:
        answer = self._ask(f"set {name} {delay_ms:g} {loss:g}")
        if answer != "ok":
            raise RuntimeError(f"delay line: {answer}")
        self.settings[name] = (float(delay_ms), float(loss))

    def stats(self) -> dict[str, Any]:
        answer = self._ask("stats")
        return json.loads(answer or "{}")

    def stop(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """Quit (the last stats are kept in ``final_stats``); kill if it does not go."""
        if self.proc.poll() is None:
            try:
                with self._lock:
                    assert self.proc.stdin is not None
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.flush()
                    line = self._read_line(timeout_s)
                if line and line.startswith("{"):
                    self.final_stats = json.loads(line)
                self.proc.wait(timeout=timeout_s)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.kill()
        return self.final_stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin,):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


if __name__ == "__main__":
    main()
