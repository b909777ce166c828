"""Federated distillation of the fallback (issue 18) with Flower's deployment runtime: a real
SuperLink, one real SuperNode per edge and ``flwr run``, all on 127.0.0.1.

One federation serves the round tests (one round, five edges: two honest, one sending NaN,
one a wrong-shaped tensor, one killed mid-round); the other tests are small."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

pytest.importorskip("flwr")

from splitinfer.cloud.federate_run import SuperLinkProcess  # noqa: E402
from splitinfer.cloud.process import CloudProcess  # noqa: E402
from splitinfer.cloud.store import ModelStore  # noqa: E402
from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input  # noqa: E402
from splitinfer.edge.learn import BufferRecorder, SuperNodeProcess, learning  # noqa: E402
from splitinfer.edge.learn_client import build_reply, fit_round  # noqa: E402
from splitinfer.models.loader import load_model  # noqa: E402
from splitinfer.models.signing import TrustSet, keygen  # noqa: E402
from splitinfer.models.versions import UpdateRefused  # noqa: E402
from splitinfer.train.federated_buffer import BufferLimits, LearnBuffer  # noqa: E402
from splitinfer.train.federated_fit import shared_state  # noqa: E402
from splitinfer.util.flower_procs import free_port  # noqa: E402

STUDENT = "student:tinycnn-digits"
pytestmark = pytest.mark.timeout(240)


def _edge_buffer(folder: Path, offset: int, n: int = 128) -> LearnBuffer:
    from splitinfer.models.data import digits_dataset
    from splitinfer.train.federated_shifts import SHIFTS, apply_shift

    data = digits_dataset((3, 32, 32), max_train=offset + n)
    x = data.x_train[offset : offset + n].contiguous()
    parts = x.chunk(len(SHIFTS) + 1)  # clean and every shift: the held-out check's mix
    x = torch.cat([parts[0], *(apply_shift(p, s, seed=offset + i) for i, (p, s) in enumerate(zip(parts[1:], SHIFTS.values())))])
    with torch.no_grad():
        logits = load_model("tinycnn-digits").module.eval()(x)
    buf = LearnBuffer()
    buf.add(x, logits)
    buf.save(folder)
    return buf


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One round over five SuperNodes; the slow one is killed while the round waits for it."""
    root = tmp_path_factory.mktemp("federation")
    key, pub = keygen(root / "signing")
    faults = {"a": None, "b": None, "nan": "nan", "shape": "shape", "dropped": "slow:600"}
    for i, name in enumerate(faults):
        _edge_buffer(root / name, 128 * i)
    link = SuperLinkProcess(root / "server").start()
    nodes = {name: SuperNodeProcess(link.address, root / name, seed=i, fault=fault).start()
             for i, (name, fault) in enumerate(faults.items())}  # fmt: skip
    box: dict[str, Any] = {}
    config = {"model": STUDENT, "rounds": 1, "min-clients": len(faults), "round-timeout": 45.0, "local-epochs": 2, "lr": 0.01,
              "store": str(root / "store"), "key": str(key), "trust": str(pub), "out-dir": str(root / "run")}  # fmt: skip
    runner = threading.Thread(target=lambda: box.update(result=link.run(config, timeout_s=200)))
    started = time.monotonic()
    try:
        runner.start()
        log = root / "dropped" / "supernode.log"
        while time.monotonic() - started < 150 and not (log.is_file() and "flwr-clientapp" in log.read_text(errors="replace")):
            time.sleep(0.3)
        time.sleep(1.0)  # the dropped edge is mid-round now: its ClientApp sleeps
        nodes["dropped"].stop(kill=True)
        killed_at = time.monotonic() - started
        runner.join(200)
        yield {"result": box.get("result"), "root": root, "pub": pub, "killed_at": killed_at,
               "elapsed": time.monotonic() - started, "link": link, "nodes": nodes}  # fmt: skip
    finally:
        for n in nodes.values():
            n.stop(kill=True)
        link.stop(kill=True)


def test_a_round_runs_and_aggregates(federation: dict[str, Any]) -> None:
    result = federation["result"]
    assert result is not None, "the run wrote no result"
    r0, r1 = result["rounds"]
    assert r1["round"] == 1 and r1["aggregated"] == 2 and r1["num_examples"] == [128, 128]
    initial = load_model(STUDENT).module
    from splitinfer.models.versions import load_tensors

    after = load_tensors(federation["root"] / "run" / "round-1.safetensors")
    before = shared_state(initial)
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())  # the NaN update did not get in
    assert all(b == sum(v.numel() * 4 for v in shared_state(initial).values()) for b in r1["upload_bytes"])


def test_nan_and_wrong_shape_updates_are_refused_and_the_round_continues(federation: dict[str, Any]) -> None:
    r1 = federation["result"]["rounds"][1]
    reasons = sorted(r["why"] for r in r1["refused"])
    assert len(reasons) == 2
    assert reasons[0].startswith("non-finite") and reasons[1].startswith("wrong shape")
    assert r1["aggregated"] == 2  # the honest two, averaged


def test_a_client_dropping_mid_round_leaves_the_others_aggregated(federation: dict[str, Any]) -> None:
    r1 = federation["result"]["rounds"][1]
    assert r1["replies"] - r1["failed"] == 4  # five sampled: the killed one never answered
    assert federation["elapsed"] < 180


def test_the_published_student_goes_through_the_signed_update_path(federation: dict[str, Any]) -> None:
    r0, r1 = federation["result"]["rounds"]
    store = ModelStore(federation["root"] / "store")
    if r1["check_accuracy"] <= r0["check_accuracy"]:
        assert r1["published_version"] is None and store.versions(STUDENT) == []
        pytest.skip("the one round did not improve the held-out check: nothing published (as it should)")
    assert r1["published_version"] == 1 and store.versions(STUDENT) == [1]
    trust = TrustSet.from_files([str(federation["pub"])])
    state = store.load_state(STUDENT, 1, trust)  # signature and every tensor hash verified
    module = load_model(STUDENT).module
    module.load_state_dict(state)
    m, sig = store.manifest(STUDENT, 1)
    other, _ = keygen(federation["root"] / "other")
    with pytest.raises(UpdateRefused):
        TrustSet.from_files([str(other.with_suffix(".pub"))]).verify(m, sig)


def test_buffer_is_bounded_by_count_bytes_and_age(tmp_path: Path) -> None:
    now = [1000.0]
    one = 3 * 32 * 32 * 4 + 10 * 4
    buf = LearnBuffer(BufferLimits(max_items=5, max_bytes=3 * one, max_age_s=60), clock=lambda: now[0])
    buf.add(torch.zeros(4, 3, 32, 32), torch.zeros(4, 10))
    assert len(buf) == 3 and buf.nbytes == 3 * one  # bytes bound the four to three
    buf = LearnBuffer(BufferLimits(max_items=5, max_bytes=10**9, max_age_s=60), clock=lambda: now[0])
    for i in range(8):
        buf.add(torch.full((1, 3, 32, 32), float(i)), torch.zeros(1, 10))
    assert len(buf) == 5 and buf.tensors()["x"][0, 0, 0, 0] == 3.0  # count: the oldest went first
    now[0] += 61
    assert len(buf) == 0 and buf.nbytes == 0  # age
    buf.add(torch.ones(2, 3, 32, 32), torch.ones(2, 10))
    buf.save(tmp_path)
    assert len(LearnBuffer.load(tmp_path, clock=lambda: now[0])) == 2
    assert len(LearnBuffer.load(tmp_path, clock=lambda: now[0] + 3600 * 25)) == 0  # age applies after a reload too


def test_nothing_of_the_buffer_is_sent(tmp_path: Path) -> None:
    buf = _edge_buffer(tmp_path, 0, n=16)
    global_state = shared_state(load_model(STUDENT).module)
    reply = fit_round(STUDENT, global_state, buf, {"local-epochs": 1}, seed=0)
    assert set(reply.array_records) == {"arrays"} and set(reply.metric_records) == {"metrics"}
    assert not reply.config_records
    arrays = reply["arrays"]
    assert {k: tuple(arrays[k].shape) for k in arrays} == {k: tuple(v.shape) for k, v in global_state.items()}
    assert set(reply["metrics"]) <= {"num-examples", "upload-bytes", "train-loss", "steps", "update-norm"}
    assert reply["metrics"]["upload-bytes"] == sum(v.numel() * 4 for v in global_state.values())
    empty = build_reply(global_state, 0, {})
    assert empty["metrics"]["num-examples"] == 0
    # only the cloud's answers become labels
    rec = BufferRecorder(tmp_path / "rec")
    x = torch.zeros(1, 3, 32, 32)
    rec(x, SimpleNamespace(source="fallback", ok=True, outputs={"out": torch.zeros(1, 10)}))
    rec(x, SimpleNamespace(source="cloud", ok=False, outputs={}))
    rec(x, SimpleNamespace(source="cloud", ok=True, outputs={"out": torch.ones(1, 10)}))
    assert len(rec.buffer) == 1


async def test_the_edge_keeps_serving_when_the_federated_server_is_gone(tmp_path: Path) -> None:
    worker = CloudProcess("--model", "tinycnn-digits", "--host", "127.0.0.1")
    link = SuperLinkProcess(tmp_path / "server").start()
    address = link.address
    link.stop(kill=True)  # the server is gone before and while the edge serves
    try:
        cfg = AgentConfig(model="tinycnn-digits", cloud=worker.url, cut="cloud", warmup=0, fallback=STUDENT,
                          learn=True, learn_dir=str(tmp_path / "buf"), federate=address)  # fmt: skip
        with learning(cfg, None) as hooks:
            async with EdgeAgent(cfg, hooks) as agent:
                answers = [await agent.infer(request_input(agent.runner.loaded, i)) for i in range(6)]  # type: ignore[union-attr]
                node_alive = hooks.after_answer_tensors.node.running  # retrying the SuperLink, in its own process
        assert all(a.ok for a in answers) and {a.source for a in answers} == {"cloud"}
        assert node_alive
        saved = LearnBuffer.load(tmp_path / "buf")
        assert len(saved) == 6  # the cloud's answers, kept on the device
        assert saved.tensors()["logits"].shape == (6, 10)
    finally:
        worker.kill()


def test_federate_needs_learn() -> None:
    from splitinfer.errors import UserError

    with pytest.raises(UserError):
        AgentConfig(model="tinycnn-digits", cut="edge", federate=f"127.0.0.1:{free_port()}")
