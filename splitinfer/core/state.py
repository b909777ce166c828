"""State in a captured graph: inputs and outputs that are a cache, pinned to their side.

A generative model's step reads its cache (a KV cache: past keys/values) and returns the
cache's new entries. Such a tensor is *state*: it is not sent with a request, it lives
where the nodes that use it run, and a split keeps it there (the head keeps the caches of
its blocks, the tail its own). The graph marks it (``GraphNode.state``, a *slot* name):

- a *state input* (a placeholder) lives on the side of the nodes that read it: it never
  crosses, and a cut whose readers of it sit on both sides (or that makes the tail
  recompute a value from a head-side one) would have to ship it: not a candidate;
- a *state output* stays on the side that produces it: it is not part of the result the
  cloud returns (``Graph.output_bytes`` leaves it out), and a cut that sends it to the
  tail (a tail node reads it) is not a candidate;
- an input and an output with the same slot name are one cache before and after the
  step: both must sit on the same side (else the next step would ship it).

So ``crossing``/``cut_bytes`` never count state, ``is_sendable`` (hence ``is_candidate``
and naming a cut) refuses a cut that would ship it, and the partitioner's min-cut ties
each state tensor to its readers. A graph without state behaves exactly as before.

The way in is ``splitinfer.core.graph.capture(module, example, state_inputs=...,
state_outputs=...)``: indices into the flat example and into the flat outputs, or dicts
{index: slot} to pair an input with an output (see :func:`state_slots`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

from splitinfer.errors import UserError

StateSpec = Union[Sequence[int], Mapping[int, str]]

__all__ = ["StateMixin", "StateSpec", "state_slots"]


def _as_slots(spec: StateSpec, count: int, what: str, default: str) -> dict[int, str]:
    items = spec.items() if isinstance(spec, Mapping) else ((i, None) for i in spec)
    slots: dict[int, str] = {}
    for index, slot in items:
        i = int(index)
        if not -count <= i < count:
            raise UserError(f"state {what} {index} out of range: the model has {count} {what}s")
        i %= count
        if i in slots:
            raise UserError(f"state {what} {index} given twice")
        slots[i] = str(slot) if slot is not None else f"{default}{i}"
    return slots


def state_slots(
    inputs: Sequence[str], outputs: Sequence[str], state_inputs: StateSpec, state_outputs: StateSpec
) -> dict[str, str]:
    """{node name: slot} for the marked placeholders (`inputs`, in order) and output producers.

    A list marks each entry as its own slot (``in:<i>``, ``out:<i>``); a dict {index: slot}
    pairs an input and an output that share a slot name (one cache, before and after)."""
    marks: dict[str, str] = {}
    for i, slot in _as_slots(state_inputs, len(inputs), "input", "in:").items():
        marks[inputs[i]] = slot
    seen_slots = set(marks.values())
    out_marks: dict[str, str] = {}
    for i, slot in _as_slots(state_outputs, len(outputs), "output", "out:").items():
        name = outputs[i]
        if name in marks:
            raise UserError(f"output {i} is a model input returned as it is: it cannot be state")
        if outputs.count(name) > 1:
            raise UserError(f"output {i} ({name}) is returned more than once: it cannot be state")
        out_marks[name] = slot
    if len(set(out_marks.values())) != len(out_marks) or len(seen_slots) != len(marks):
        raise UserError("a state slot names more than one input or more than one output")
    return {**marks, **out_marks}


class StateMixin:
    """The state half of ``Graph`` (splitinfer.core.graph): which nodes are state and
    whether a head keeps every state tensor on one side. Hosts provide ``nodes``,
    ``outputs``, ``node``, ``consumers``, ``is_check`` and ``_cut_values``."""

    nodes: tuple[Any, ...]  # GraphNode (core.graph imports this module, not the reverse)
    outputs: tuple[str, ...]

    @property
    def has_state(self) -> bool:
        return any(n.state for n in self.nodes)

    def is_state(self, name: str) -> bool:
        return bool(self.node(name).state)  # type: ignore[attr-defined]

    @property
    def state_inputs(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.state and n.op == "placeholder")

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(o for o in self.outputs if self.node(o).state)  # type: ignore[attr-defined]

    @property
    def result_outputs(self) -> tuple[str, ...]:
        """The outputs that are the step's result (returned to the caller), state left out."""
        return tuple(o for o in self.outputs if not self.node(o).state)  # type: ignore[attr-defined]

    def _live_readers(self, name: str) -> list[str]:
        return [c for c in self.consumers(name) if not self.is_check(c)]  # type: ignore[attr-defined]

    def state_side(self, head: Iterable[str]) -> dict[str, bool | None]:
        """Each state node's side for this head: True = edge (head), False = cloud (tail),
        None = a state input nothing reads. A state input is where its readers are."""
        hs = set(head)
        sides: dict[str, bool | None] = {}
        for n in self.nodes:
            if not n.state:
                continue
            if n.op == "placeholder":
                readers = self._live_readers(n.name)
                sides[n.name] = None if not readers else readers[0] in hs
            else:
                sides[n.name] = n.name in hs
        return sides

    def state_conflicts(self, head: Iterable[str]) -> list[str]:
        """Why this head would ship state (empty: it keeps every state tensor on its side)."""
        if not self.has_state:
            return []
        hs = set(head)
        redo = set(self._cut_values(hs)[1])  # type: ignore[attr-defined]
        sides = self.state_side(hs)
        why: list[str] = []
        slot_side: dict[str, tuple[str, bool]] = {}
        for name, side in sides.items():
            readers = self._live_readers(name)
            if self.node(name).op == "placeholder":  # type: ignore[attr-defined]
                if len({r in hs for r in readers}) > 1 or any(r in redo for r in readers):
                    why.append(f"state input {name!r} is read on both sides of the cut")
            elif side and any(r not in hs for r in readers):
                why.append(f"state output {name!r} is made on the edge but read in the cloud")
            if side is None:
                continue
            slot = self.node(name).state  # type: ignore[attr-defined]
            if slot in slot_side and slot_side[slot][1] != side:
                why.append(f"state {slot!r}: {slot_side[slot][0]!r} and {name!r} would sit on different sides")
            slot_side.setdefault(slot, (name, side))
        return why

    def ships_state(self, head: Iterable[str]) -> bool:
        return bool(self.state_conflicts(head))

    def state_pairs(self) -> list[tuple[str, str]]:
        """(state input, state output) sharing a slot: one cache before and after the step."""
        by_slot: dict[str, str] = {self.node(p).state: p for p in self.state_inputs}  # type: ignore[attr-defined]
        return [(by_slot[s], o) for o in self.state_outputs if (s := self.node(o).state) in by_slot]  # type: ignore[attr-defined]
