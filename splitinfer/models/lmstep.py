"""One step of a causal LM as a module with its cache as explicit state, for the partitioner.

:class:`StepModule` wraps a :class:`~splitinfer.models.lm.CausalLM` step (prefill, decode or
verify: any number of new tokens after a cache of P positions) as a function of tensors:

    forward(tokens (B,T), positions (B,T), k_0, v_0, mask_0, k_1, v_1, mask_1, ...)
        -> (logits (B,T,256), new_k_0, new_v_0, new_k_1, new_v_1, ...)

with ``k_i, v_i`` (B,H,P,Dh) block i's past keys/values and ``mask_i`` (B,P) which of them
are real. Each block carries its own mask: it is part of that block's cache (each side of a
split builds it from the caches it holds, as ``models.kvcache`` does), so it is state too.

:func:`capture_step` traces it (torch.export) and marks every ``k_i, v_i, mask_i`` input
and every ``new_k_i, new_v_i`` output as state (``splitinfer.core.state``), slots ``k{i}``/
``v{i}`` pairing a block's past with its new entries. A cut then ships only what the tail
cannot compute itself: after block c, the (B,T,d_model) hidden state.
:func:`block_cut_head` names the head of "blocks [0, c) on the edge".

The step checks no positions (``embed(check=False)``): callers check them before a step
(``CausalLM.check_positions``); a Python test on a tensor value cannot be traced.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from splitinfer.core.graph import Graph, capture
from splitinfer.models.lm import CausalLM

__all__ = ["StepModule", "block_cut_head", "capture_step", "cut_report", "step_example", "step_state", "unmarked"]


class StepModule(nn.Module):
    """A CausalLM step over explicit caches (see the module docstring for the signature)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.m = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.m
        h = m.embed(tokens, positions, check=False)
        new: list[torch.Tensor] = []
        for i, block in enumerate(m.blocks):
            h, k, v = block(h, past[3 * i], past[3 * i + 1], past[3 * i + 2])
            new += [k, v]
        return (m.logits(h), *new)


def step_example(
    model: CausalLM, context: int, new_tokens: int = 1, batch: int = 1, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Inputs of one step: `new_tokens` tokens after `context` cached positions (random cache)."""
    cfg = model.cfg
    model.check_positions(torch.tensor([context + new_tokens - 1]))
    g = torch.Generator().manual_seed(seed)
    dtype = model.tok.weight.dtype
    tokens = torch.randint(0, 256, (batch, new_tokens), generator=g)
    positions = torch.arange(context, context + new_tokens).expand(batch, new_tokens).clone()
    past: list[torch.Tensor] = []
    for _ in range(cfg.n_layers):
        shape = (batch, cfg.n_heads, context, cfg.head_dim)
        past += [torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
                 torch.ones(batch, context, dtype=torch.bool)]  # fmt: skip
    return (tokens, positions, *past)


def step_state(n_layers: int) -> tuple[dict[int, str], dict[int, str]]:
    """(state inputs, state outputs) of StepModule as {index: slot} for ``capture``."""
    inputs: dict[int, str] = {}
    outputs: dict[int, str] = {}
    for i in range(n_layers):
        inputs.update({2 + 3 * i: f"k{i}", 3 + 3 * i: f"v{i}", 4 + 3 * i: f"mask{i}"})
        outputs.update({1 + 2 * i: f"k{i}", 2 + 2 * i: f"v{i}"})
    return inputs, outputs


def capture_step(
    model: CausalLM, context: int = 64, new_tokens: int = 1, *, state: bool = True
) -> tuple[fx.GraphModule, Graph]:
    """Trace one step at this context; ``state=False`` leaves the caches unmarked (as every
    graph was before state existed: the cut then ships them)."""
    example = step_example(model, context, new_tokens)
    step = StepModule(model).eval()
    if not state:
        return capture(step, example)
    ins, outs = step_state(model.n_layers)
    return capture(step, example, state_inputs=ins, state_outputs=outs)


def _block_input(graph: Graph, block: int) -> str:
    """The residual stream entering `block`: up from its new keys, the first node that
    reads more than one tensor (the previous block's residual add, or the embedding sum)."""
    key_out = graph.outputs[1 + 2 * block]
    name = key_out
    while len(graph.node(name).inputs) == 1:
        name = graph.node(name).inputs[0]
    if graph.node(name).op == "placeholder":
        raise ValueError(f"cannot find the input of block {block} in the captured step")
    return name


def block_cut_head(graph: Graph, cut: int) -> frozenset[str]:
    """The head of the split that runs embed + blocks [0, cut) on the edge (0 < cut < n)."""
    n_layers = (len(graph.outputs) - 1) // 2
    if not 0 < cut < n_layers:
        raise ValueError(f"a block cut is in 1..{n_layers - 1}, got {cut}")
    return graph.canonical_head(graph.head_from_crossing([_block_input(graph, cut)]))


def unmarked(graph: Graph) -> Graph:
    """The same graph with no state marked: how every graph was captured before state existed."""
    return Graph(nodes=tuple(replace(n, state="") for n in graph.nodes), outputs=graph.outputs)


def cut_report(model: CausalLM, cut: int, context: int = 64) -> dict:
    """What a decode step's cut after block cut-1 sends, with the caches unmarked and marked."""
    _, g = capture_step(model, context)
    head = block_cut_head(g, cut)
    out: dict = {"cut": cut, "context": context, "d_model": model.cfg.d_model, "n_layers": model.n_layers}
    for key, graph in (("without_state", unmarked(g)), ("with_state", g)):
        tensors = graph.crossing(head)
        out[key] = {"tensors": len(tensors), "bytes": graph.cut_bytes(head), "names": tensors}
    return out
