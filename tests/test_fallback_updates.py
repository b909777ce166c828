"""The edge installs the published fallback student (issue 18): a real worker serving the
store, a real agent following it; the student's BatchNorm adapted to the edge's own buffer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from splitinfer.cloud.store import ModelStore
from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
from splitinfer.edge.fallback_updates import MIN_ADAPT_SAMPLES, install_student
from splitinfer.edge.hooks import AgentHooks
from splitinfer.edge.learn import BufferRecorder
from splitinfer.edge.status import agent_status
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.train.federated_fit import adapt_batchnorm

pytestmark = pytest.mark.timeout(300)

TEACHER = "tinycnn-digits"
STUDENT = "student:tinycnn-digits"


def _improved(delta: float = 0.05) -> dict[str, torch.Tensor]:
    """The shipped student with its classifier and one BatchNorm's statistics changed (a
    federated round changes both: the statistics are averaged too)."""
    state = {k: v.clone() for k, v in load_model(STUDENT).module.state_dict().items()}
    fc = [k for k in state if k.endswith("weight") and state[k].dim() == 2][-1]
    state[fc] += delta
    mean = next(k for k in state if k.endswith("running_mean"))
    state[mean] += 0.5
    return state


async def _until(cond: Callable[[], bool], what: Callable[[], Any], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.05)


def _config(url: str, pub: Path) -> AgentConfig:
    return AgentConfig(model=TEACHER, cloud=url, cut="2", warmup=0, fallback=STUDENT, follow_updates=True,
                       trust=(str(pub),), update_poll_s=0.1, advertise=False)  # fmt: skip


def test_edge_installs_the_published_student_with_batchnorm_from_its_own_buffer(cloud_process, tmp_path: Path,
                                                                                 keys) -> None:  # fmt: skip
    store = ModelStore(tmp_path / "store")
    w = cloud_process("-m", TEACHER, "--store", str(store.root), "--trust", str(keys[1]))
    recorder = BufferRecorder(tmp_path / "buffer")

    async def go() -> None:
        async with EdgeAgent(_config(w.url, keys[1]), hooks=AgentHooks(after_answer_tensors=recorder)) as agent:
            assert agent.fallback_updates is not None and agent.fallback is not None
            shipped = weights_hash(agent.fallback.loaded.module)
            # this edge's camera: darker and noisier than the data the student was trained on
            for i in range(MIN_ADAPT_SAMPLES + 8):
                x = request_input(agent.runner.loaded, i) * 0.5 - 0.3  # type: ignore[union-attr]
                answer = await agent.infer(x)
                assert answer.ok and answer.source == "cloud", answer.error
            buffered = recorder.buffer.tensors()["x"]
            assert buffered.shape[0] == MIN_ADAPT_SAMPLES + 8
            assert agent.fallback_updates.version is None  # nothing published yet
            improved = _improved()
            m = store.publish(STUDENT, STUDENT, improved, keys[0], "federated round 1")  # v1: current
            await _until(lambda: agent.fallback_updates.version == 1, agent.fallback_updates.describe)
            got = agent.fallback.loaded.module
            info = agent.fallback_updates.describe()
            assert info["updates"] == 1 and info["bn_adapted_on"] == buffered.shape[0] and info["refusals"] == 0
            # the published weights, except BatchNorm's statistics: this edge's own
            expected = adapt_batchnorm(install_student(load_model(STUDENT).module, improved, None)[0], buffered)
            for k, v in got.state_dict().items():
                assert torch.allclose(v.float(), expected.state_dict()[k].float(), atol=1e-6), k
            mean = next(k for k in improved if k.endswith("running_mean"))
            assert not torch.allclose(got.state_dict()[mean], improved[mean])
            assert weights_hash(got) not in (shipped, m.total_hash)
            # only the changed tensors travelled
            assert 0 < info["bytes_downloaded"] < sum(t.numel() * t.element_size() for t in improved.values())
            # and the fallback answers with it
            x = request_input(agent.runner.loaded, 99) * 0.5 - 0.3  # type: ignore[union-attr]
            out, _ = await agent.fallback.run(x)
            with torch.no_grad():
                assert torch.allclose(next(iter(out.values())), expected(x), atol=1e-6)
            assert agent_status(agent)["fallback_version"]["version"] == 1  # type: ignore[arg-type]

    asyncio.run(go())


def test_untrusted_or_unfitting_student_versions_are_refused_and_change_nothing(cloud_process, tmp_path: Path,
                                                                                keys) -> None:  # fmt: skip
    store = ModelStore(tmp_path / "store")
    w = cloud_process("-m", TEACHER, "--store", str(store.root), "--trust", str(keys[1]))

    async def go() -> None:
        async with EdgeAgent(_config(w.url, keys[1])) as agent:
            assert agent.fallback_updates is not None and agent.fallback is not None
            before = weights_hash(agent.fallback.loaded.module)
            store.publish(STUDENT, STUDENT, _improved(), keys[2], "signed by a key the edge does not trust")
            await _until(lambda: agent.fallback_updates.counters["refusals"] >= 1, agent.fallback_updates.describe)
            assert "not signed by a trusted key" in str(agent.fallback_updates.counters["last_error"])
            assert weights_hash(agent.fallback.loaded.module) == before and agent.fallback_updates.version is None
            # trusted, but not the student's shape: refused on install, the old one keeps answering
            bad = _improved()
            name = next(k for k in bad if k.endswith("weight") and bad[k].dim() == 2)
            bad[name] = torch.zeros(3, 3)
            store.publish(STUDENT, STUDENT, bad, keys[0], "does not fit")
            store.rollout(STUDENT, 2, None)
            await _until(lambda: agent.fallback_updates.counters["refusals"] >= 2, agent.fallback_updates.describe)
            assert weights_hash(agent.fallback.loaded.module) == before and agent.fallback_updates.version is None
            # without a --learn buffer a good version is installed with the published statistics
            good = _improved(0.07)
            m = store.publish(STUDENT, STUDENT, good, keys[0], "good")
            store.rollout(STUDENT, m.version, None)
            await _until(lambda: agent.fallback_updates.version == m.version, agent.fallback_updates.describe)
            assert weights_hash(agent.fallback.loaded.module) == m.total_hash
            assert agent.fallback_updates.counters["bn_adapted_on"] == 0
            x = request_input(agent.runner.loaded, 0)  # type: ignore[union-attr]
            assert (await agent.infer(x)).ok  # the agent keeps serving through all of it

    asyncio.run(go())
