"""The Flower ClientApp of an edge that learns: one round = fine-tune the fallback student
on this device's buffer, reply with its weights and sample count.

A SuperNode (one per edge, :mod:`splitinfer.edge.learn`) runs it in a fresh process per
round; it reads the buffer the agent saved on this device (node config ``buffer-dir``) and
replies with only what the server needs: the student's float tensors (the model's own
names and shapes) and a few numbers (``num-examples``, loss, ``upload-bytes``). No input,
soft label or ground truth from the buffer is ever put into the reply
(:func:`build_reply` is the one place a reply is made).

Node config ``fault`` drills the server's defences: ``nan`` (NaN weights), ``shape``
(a wrong-shaped tensor), ``exit`` (the process dies mid-round), ``slow:S`` (sleeps S s first).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from splitinfer.models.loader import load_model
from splitinfer.train.federated_buffer import LearnBuffer
from splitinfer.train.federated_fit import DPConfig, FitConfig, load_shared, local_fit

__all__ = ["app", "build_reply", "fit_round"]

log = logging.getLogger(__name__)

app = ClientApp()


def build_reply(shared: dict[str, torch.Tensor], num_examples: int, metrics: dict[str, float]) -> RecordDict:
    """The only content an edge sends: weights by name and scalar metrics."""
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in shared.items()})
    upload = sum(int(v.numel() * v.element_size()) for v in shared.values())
    record = {"num-examples": int(num_examples), "upload-bytes": upload}
    record.update({k: float(v) for k, v in metrics.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(record)})


def _fit_config(cfg: dict, seed: int) -> FitConfig:
    noise = float(cfg.get("dp-noise", 0.0))
    clip = float(cfg.get("dp-clip", 0.0))
    return FitConfig(
        epochs=int(cfg.get("local-epochs", 2)), batch=int(cfg.get("batch", 32)), lr=float(cfg.get("lr", 0.05)),
        temperature=float(cfg.get("temperature", 2.0)), mu=float(cfg.get("proximal-mu", 0.0)),
        seed=seed, dp=DPConfig(clip=clip, noise=noise) if clip > 0 else None,
    )  # fmt: skip


def fit_round(model_spec: str, global_state: dict[str, torch.Tensor], buffer: LearnBuffer, cfg: dict, seed: int) -> RecordDict:
    """Load the global weights, fine-tune on the buffer, build the reply."""
    torch.set_num_threads(1)
    module = load_model(model_spec).module
    load_shared(module, global_state)
    data = buffer.tensors()
    if not data:
        return build_reply({k: v.clone() for k, v in global_state.items()}, 0, {"train-loss": 0.0})
    shared, metrics = local_fit(module, data["x"], data["logits"], _fit_config(cfg, seed))
    return build_reply(shared, int(data["x"].shape[0]), metrics)


def _apply_fault(fault: str, content: RecordDict) -> RecordDict:
    if fault.startswith("slow:"):
        time.sleep(float(fault.split(":", 1)[1]))
    elif fault == "exit":
        os._exit(3)  # a device that dies mid-round: no reply at all
    elif fault in ("nan", "shape"):
        arrays = content["arrays"]
        first = sorted(arrays.keys())[0]
        bad = np.full(arrays[first].shape, np.nan, np.float32) if fault == "nan" else np.zeros((3, 3), np.float32)
        arrays[first] = Array(bad)
    return content


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this device."""
    cfg = dict(msg.content["config"])
    node = dict(context.node_config)
    fault = str(node.get("fault", ""))
    if fault.startswith("slow:") or fault == "exit":
        _apply_fault(fault, msg.content)
    global_state = msg.content["arrays"].to_torch_state_dict()
    buffer = LearnBuffer.load(str(node["buffer-dir"]))
    seed = int(node.get("seed", 0)) * 1000 + int(cfg.get("server-round", 0))
    content = fit_round(str(cfg["model"]), global_state, buffer, cfg, seed)
    if fault in ("nan", "shape"):
        content = _apply_fault(fault, content)
    log.info("round %s: %s samples", cfg.get("server-round"), content["metrics"]["num-examples"])
    return Message(content=content, reply_to=msg)
