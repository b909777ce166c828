"""The federated server's ServerApp: Flower's FedAvg / FedProx with every update screened,
a held-out check after each round, and the improved student published as a signed version.

Flower aggregates; this module only wraps its strategies. A reply whose tensors are not the
student's names and shapes, or are not all finite, is refused (logged, counted per round)
and the round goes on with the others; a client that never answers is left out when the
round's timeout passes (Flower's ``send_and_receive`` timeout). After each round the global
student is scored on the cloud's held-out check (the lab's held-out digits under every field
shift, ground-truth labels; BatchNorm re-estimated per group, as edges install it); a round that beats the best score so far is published into the
model store (``cloud.store.ModelStore.publish``: safetensors + Ed25519-signed manifest, the
parent is the previous version, so edges fetch only the changed tensors and can roll back).

Run configuration (``[tool.flwr.app.config]``, written by :mod:`splitinfer.cloud.federate_run`):
model, rounds, min-clients, strategy, proximal-mu, round-timeout, out-dir, store, key, trust,
and the clients' local-epochs, lr, batch, temperature, dp-clip, dp-noise.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from splitinfer.models.data import digits_dataset
from splitinfer.models.loader import load_model
from splitinfer.train.federated_fit import accuracy, adapt_batchnorm, load_shared, screen_update, shared_state
from splitinfer.train.federated_shifts import SHIFTS, apply_shift

__all__ = ["RESULT_FILE", "ScreenedFedAvg", "ScreenedFedProx", "app", "check_set"]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CHECK_PER_SHIFT = 120  # held-out digits per group of the check (clean + each shift)
CLIENT_KEYS = ("local-epochs", "lr", "batch", "temperature", "dp-clip", "dp-noise")

app = ServerApp()


class _Screening:
    """Refuse malformed updates before Flower's aggregation sees them."""

    def setup_screening(self, reference: dict[str, tuple[int, ...]]) -> None:
        self.reference = reference
        self.rounds: dict[int, dict] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        good, refused, failed = [], [], 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                continue
            try:
                update = {k: v.numpy() for k, v in msg.content["arrays"].items()}
                why = screen_update(self.reference, update)
            except Exception as exc:  # a reply that does not even parse is refused the same way
                why = f"unreadable update: {exc}"
            if why is None:
                good.append(msg)
            else:
                refused.append({"node": int(msg.metadata.src_node_id), "why": why})
                log.warning("round %d: refused the update of node %s: %s", server_round, msg.metadata.src_node_id, why)
        metrics = [dict(m.content["metrics"]) for m in good]
        self.rounds[server_round] = {
            "replies": len(replies), "aggregated": len(good), "refused": refused, "failed": failed,
            "upload_bytes": [int(m.get("upload-bytes", 0)) for m in metrics],
            "num_examples": [int(m.get("num-examples", 0)) for m in metrics],
        }  # fmt: skip
        if not good:
            return None, None  # nothing usable: the global model stays as it was
        return super().aggregate_train(server_round, good)  # type: ignore[misc]


class ScreenedFedAvg(_Screening, FedAvg):
    """FedAvg with screened updates."""


class ScreenedFedProx(_Screening, FedProx):
    """FedProx (proximal term on the clients) with screened updates."""


def check_set(input_shape: tuple[int, ...], per_shift: int = CHECK_PER_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """The cloud's held-out check: held-out digits, clean and under every field shift."""
    data = digits_dataset(input_shape)
    xs, ys = [data.x_test[:per_shift].contiguous()], [data.y_test[:per_shift]]
    for i, shift in enumerate(SHIFTS.values()):
        xs.append(apply_shift(data.x_test[:per_shift], shift, seed=10_000 + i))
        ys.append(data.y_test[:per_shift])
    return torch.cat(xs), torch.cat(ys)


def check_accuracy(module: torch.nn.Module, x_check: torch.Tensor, y_check: torch.Tensor, per_shift: int) -> float:
    """The check's mean over its groups (clean, each shift) of the student as an edge runs it:
    BatchNorm statistics re-estimated on the group's own inputs (label-free), as an edge does
    on install (edge/fallback_updates.py). The averaged statistics fit no edge in particular,
    so scoring them would publish the rounds that suit the mean input, not the edges."""
    scores = []
    for i in range(0, x_check.shape[0], per_shift):
        x, y = x_check[i : i + per_shift], y_check[i : i + per_shift]
        scores.append(accuracy(adapt_batchnorm(copy.deepcopy(module), x), x, y))
    return sum(scores) / len(scores)


def _publish(rc: dict, module: torch.nn.Module, round_: int, score: float) -> int | None:
    from splitinfer.cloud.store import ModelStore
    from splitinfer.models.signing import TrustSet

    if not rc.get("store") or not rc.get("key"):
        return None
    trust = TrustSet.from_files([t for t in str(rc.get("trust", "")).split(",") if t])
    store = ModelStore(str(rc["store"]))
    m = store.publish(
        str(rc["model"]), str(rc["model"]), module.state_dict(), Path(str(rc["key"])),
        f"federated round {round_}: held-out check {score:.4f}", trust,
    )  # fmt: skip
    store.rollout(m.model, m.version, None)  # current: following edges install it (rollback: `update rollback`)
    log.info("published %s v%d as current (round %d, check %.4f)", m.model, m.version, round_, score)
    return m.version


def _strategy(rc: dict, reference: dict[str, tuple[int, ...]]) -> _Screening:
    k = int(rc.get("min-clients", 2))
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k)
    if str(rc.get("strategy", "fedavg")) == "fedprox":
        strategy: _Screening = ScreenedFedProx(proximal_mu=float(rc.get("proximal-mu", 0.01)), **common)
    else:
        strategy = ScreenedFedAvg(**common)
    strategy.setup_screening(reference)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """R rounds over the connected SuperNodes; writes out-dir/result.json and round-N.safetensors."""
    from splitinfer.models.versions import save_tensors

    torch.set_num_threads(1)
    rc = dict(context.run_config)
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(str(rc["model"]))
    module = loaded.module.eval()
    init = shared_state(module)
    reference = {k: tuple(v.shape) for k, v in init.items()}
    x_check, y_check = check_set(tuple(loaded.example_input.shape[1:]), CHECK_PER_SHIFT)
    strategy = _strategy(rc, reference)
    history: list[dict] = []
    best = {"score": -1.0}

    def evaluate(round_: int, arrays: ArrayRecord) -> MetricRecord:
        load_shared(module, arrays.to_torch_state_dict())
        score = check_accuracy(module, x_check, y_check, CHECK_PER_SHIFT)
        as_aggregated = accuracy(module, x_check, y_check)
        save_tensors(out / f"round-{round_}.safetensors", shared_state(module))
        published = None
        if round_ == 0:
            best["score"] = score
        elif score > best["score"]:
            best["score"] = score
            published = _publish(rc, module, round_, score)
        history.append({"round": round_, "check_accuracy": round(score, 4),
                        "check_accuracy_averaged_bn": round(as_aggregated, 4), "published_version": published,
                        **strategy.rounds.get(round_, {})})  # fmt: skip
        return MetricRecord({"check-accuracy": score})

    train_config = ConfigRecord({"model": str(rc["model"]), **{k: rc[k] for k in CLIENT_KEYS if k in rc}})
    started = time.time()
    strategy.start(  # type: ignore[attr-defined]
        grid=grid, initial_arrays=ArrayRecord(torch_state_dict=init), num_rounds=int(rc.get("rounds", 3)),
        timeout=float(rc.get("round-timeout", 120.0)), train_config=train_config, evaluate_fn=evaluate,
    )  # fmt: skip
    result = {"model": rc["model"], "strategy": rc.get("strategy", "fedavg"), "rounds": history,
              "elapsed_s": round(time.time() - started, 2), "best_check_accuracy": round(best["score"], 4)}  # fmt: skip
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1))

