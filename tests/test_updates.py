"""Model updates: versions, signatures, the store, the update routes, and a real edge following
a rollout from a real worker (only the changed tensors travel; the switch is between requests)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from splitinfer.cli import app
from splitinfer.cloud.store import ModelStore
from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
from splitinfer.edge.updates import in_canary
from splitinfer.errors import UserError
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.models.signing import TrustSet, sign_manifest
from splitinfer.models.versions import (
    Manifest,
    UpdateRefused,
    build_manifest,
    delta_names,
    load_tensors,
    save_tensors,
    state_hash,
    verify_tensors,
)

pytestmark = pytest.mark.timeout(300)


def _finetuned(seed: float = 0.01) -> dict[str, torch.Tensor]:
    """tinycnn's weights with only the classifier (fc) changed: a last-layer fine-tune."""
    state = {k: v.clone() for k, v in load_model("tinycnn").module.state_dict().items()}
    state["fc.weight"] += seed
    state["fc.bias"] -= seed
    return state


@pytest.fixture
def store(tmp_path: Path, keys) -> ModelStore:
    """A store with tinycnn v1 (its built-in weights, current) and v2 (fc fine-tuned)."""
    s = ModelStore(tmp_path / "store")
    s.publish("tinycnn", "tinycnn", load_model("tinycnn").module.state_dict(), keys[0], "base")
    s.publish("tinycnn", "tinycnn", _finetuned(), keys[0], "fc fine-tuned")
    return s


# --- versions and signatures -------------------------------------------------------------


def test_manifest_total_hash_is_weights_hash_and_delta_is_the_changed_layer() -> None:
    lm = load_model("tinycnn")
    state = lm.module.state_dict()
    assert state_hash(state) == weights_hash(lm.module)
    v1 = build_manifest("tinycnn", "tinycnn", 1, state, None)
    v2 = build_manifest("tinycnn", "tinycnn", 2, _finetuned(), 1)
    assert v1.total_hash == weights_hash(lm.module) and v2.parent == 1
    have = {k: e["sha256"] for k, e in v1.tensors.items()}
    assert delta_names(have, v2) == ["fc.bias", "fc.weight"]
    assert Manifest.from_json(json.loads(json.dumps(v2.to_json()))) == v2


def test_safetensors_round_trip_and_no_pickle(tmp_path: Path) -> None:
    state = _finetuned()
    save_tensors(tmp_path / "t.safetensors", state)
    assert not (tmp_path / "t.safetensors").read_bytes().startswith(b"PK")  # not a torch zip / pickle
    back = load_tensors(tmp_path / "t.safetensors")
    assert state_hash(back) == state_hash(state)
    assert set(load_tensors(tmp_path / "t.safetensors", ["fc.bias"])) == {"fc.bias"}


def test_signatures_refuse_unsigned_wrong_key_and_tampered(keys) -> None:
    key, pub, other_key, _ = keys
    m = build_manifest("tinycnn", "tinycnn", 1, _finetuned(), None)
    trust = TrustSet.from_files([str(pub)])
    trust.verify(m, sign_manifest(m, key))
    with pytest.raises(UpdateRefused, match="unsigned"):
        trust.verify(m, None)
    with pytest.raises(UpdateRefused, match="not signed by a trusted key"):
        trust.verify(m, sign_manifest(m, other_key))
    forged = Manifest(**{**m.to_json(), "notes": "changed after signing"})
    with pytest.raises(UpdateRefused, match="not signed by a trusted key"):
        trust.verify(forged, sign_manifest(m, key))
    with pytest.raises(UpdateRefused):
        trust.verify(m, "@@not base64@@")


def test_hash_mismatch_refused(keys) -> None:
    m = build_manifest("tinycnn", "tinycnn", 1, _finetuned(), None)
    state = _finetuned()
    state["fc.bias"][0] += 1.0
    with pytest.raises(UpdateRefused, match="fc.bias"):
        verify_tensors(m, state)


def test_store_persists_and_refuses_a_tampered_version(store: ModelStore, keys, tmp_path: Path) -> None:
    again = ModelStore(tmp_path / "store")  # a restart: everything from disk
    assert again.versions("tinycnn") == [1, 2] and again.state("tinycnn")["current"] == 1
    trust = TrustSet.from_files([str(keys[1])])
    assert state_hash(again.load_state("tinycnn", 2, trust)) == state_hash(_finetuned())
    with pytest.raises(UpdateRefused, match="not signed"):
        again.load_state("tinycnn", 2, TrustSet.from_files([str(keys[3])]))
    # tamper with v2's stored fc.bias: refused, v1 untouched
    path = again.tensors_path("tinycnn", 2)
    bad = load_tensors(path)
    bad["fc.bias"] = bad["fc.bias"] + 1
    save_tensors(path, bad)
    with pytest.raises(UpdateRefused, match="fc.bias"):
        again.load_state("tinycnn", 2, trust)
    again.load_state("tinycnn", 1, trust)
    with pytest.raises(UserError, match="already has these weights"):
        again.publish("tinycnn", "tinycnn", load_model("tinycnn").module.state_dict(), keys[0])
    with pytest.raises(UserError, match="bad model id"):
        again.versions("../etc")


def test_rollout_canary_and_rollback_states(store: ModelStore) -> None:
    assert store.rollout("tinycnn", 2, 10.0)["canary"] == {"version": 2, "percent": 10.0, "max_disagreement": 0.1, "min_requests": 20}
    assert store.rollback("tinycnn")["stopped"] == {"version": 2, "why": "rolled back by hand"}
    assert store.rollout("tinycnn", 2, None) == {"current": 2, "previous": 1, "canary": None}
    assert store.rollback("tinycnn") == {"current": 1, "previous": 2, "canary": None}
    with pytest.raises(UserError, match="no version 9"):
        store.rollout("tinycnn", 9, None)
    share = sum(in_canary(f"edge-{i}", 25.0) for i in range(2000)) / 2000
    assert 0.2 < share < 0.3 and in_canary("a", 100.0) and not in_canary("a", 0.0)


def test_cli_keygen_publish_rollout_rollback(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["keygen", str(tmp_path / "k")]).exit_code == 0
    weights = tmp_path / "ft.safetensors"
    save_tensors(weights, _finetuned())
    st = str(tmp_path / "s")
    res = runner.invoke(app, ["publish", "-m", "tinycnn", "--weights", str(weights), "--key", str(tmp_path / "k.key"),
                              "--store", st, "--notes", "fc"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["version"] == 1
    bad = runner.invoke(app, ["publish", "-m", "tinycnn", "--weights", str(weights), "--key", str(tmp_path / "k.key"),
                              "--store", st, "--trust", str(tmp_path / "k.pub")])  # fmt: skip
    assert bad.exit_code != 0  # the same weights again
    assert runner.invoke(app, ["rollout", "-m", "tinycnn", "--to", "1", "--canary", "10%", "--store", st]).exit_code == 0
    assert runner.invoke(app, ["rollback", "-m", "tinycnn", "--store", st]).exit_code == 0


# --- the worker's update routes ----------------------------------------------------------


async def _until_synced(url: str, timeout_s: float = 30) -> dict:
    """The versions listing once the worker's registry has caught up with its store."""
    deadline = time.monotonic() + timeout_s
    while True:
        listing = json.loads((await asyncio.to_thread(_get, url))[1])
        if listing["synced"]:
            return listing
        assert time.monotonic() < deadline, listing
        await asyncio.sleep(0.05)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_update_routes_delta_resume_and_attacks(cloud_process, store: ModelStore) -> None:
    from safetensors.torch import load

    w = cloud_process("-m", "tinycnn", "--store", str(store.root), token="sekret")
    auth = {"Authorization": "Bearer sekret"}
    base = f"{w.url}/v1/models/tinycnn"
    assert _get(f"{base}/versions")[0] == 401  # behind the infer scope
    status, body, _ = _get(f"{base}/versions", auth)
    listing = json.loads(body)
    assert status == 200 and [v["version"] for v in listing["versions"]] == [1, 2] and listing["current"] == 1
    status, body, _ = _get(f"{base}/manifest?version=2", auth)
    got = json.loads(body)
    assert status == 200 and got["manifest"]["version"] == 2 and got["signature"]

    status, body, headers = _get(f"{base}/tensors?version=2&names=fc.weight,fc.bias", auth)
    assert status == 200 and set(load(body)) == {"fc.weight", "fc.bias"}
    assert torch.equal(load(body)["fc.bias"], _finetuned()["fc.bias"])
    assert len(body) < Manifest.from_json(got["manifest"]).total_bytes / 10
    # resumable: the rest from an offset, by query or by Range
    s2, rest, h2 = _get(f"{base}/tensors?version=2&names=fc.weight,fc.bias&offset=100", auth)
    assert s2 == 206 and rest == body[100:] and h2["Content-Range"].endswith(f"/{len(body)}")
    s3, rest3, _ = _get(f"{base}/tensors?version=2&names=fc.weight,fc.bias", {**auth, "Range": "bytes=50-"})
    assert s3 == 206 and rest3 == body[50:]

    assert _get(f"{base}/tensors?version=2&names=nope", auth)[0] == 400
    assert _get(f"{base}/tensors?version=2&names=", auth)[0] == 400
    # a huge names list: refused (by the request-line limit, else by update_max_names)
    assert _get(f"{base}/tensors?version=2&names=" + ",".join(f"t{i}" for i in range(5000)), auth)[0] in (400, 413)
    assert _get(f"{base}/tensors?version=2&names=" + ",".join(["fc.bias"] * 1000), auth)[0] == 200  # deduplicated
    assert _get(f"{base}/tensors?version=2&names=fc.bias&offset=999999", auth)[0] == 416
    assert _get(f"{base}/tensors?version=2&names=fc.bias&offset=-1", auth)[0] == 400
    assert _get(f"{base}/manifest?version=7", auth)[0] == 404
    assert _get(f"{base}/manifest?version=../../x", auth)[0] == 400
    for bad_id in ("..", "..%2F..%2Fetc", "%2e%2e", "a%00b"):
        assert _get(f"{w.url}/v1/models/{bad_id}/versions", auth)[0] in (400, 404), bad_id


def test_worker_restart_keeps_its_store(cloud_process, store: ModelStore) -> None:
    store.rollout("tinycnn", 2, None)
    w = cloud_process("-m", "tinycnn", "--store", str(store.root))
    hashes = {m["id"]: m["hash"] for m in json.loads(_get(f"{w.url}/v1/models")[1])["models"]}
    assert hashes["tinycnn"] == state_hash(_finetuned())
    w.kill()
    w2 = cloud_process("-m", "tinycnn", "--store", str(store.root))
    hashes = {m["id"]: m["hash"] for m in json.loads(_get(f"{w2.url}/v1/models")[1])["models"]}
    assert hashes["tinycnn"] == state_hash(_finetuned())


# --- a real edge following a rollout -----------------------------------------------------


async def _until(pred, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_edge_follows_rollout_delta_only_switch_between_requests(cloud_process, store: ModelStore, keys) -> None:
    w = cloud_process("-m", "tinycnn", "--store", str(store.root), "--trust", str(keys[1]))
    v2 = load_model("tinycnn")
    v2.module.load_state_dict(_finetuned())

    async def go() -> None:
        follow = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0,
                             follow_updates=True, trust=(str(keys[1]),), update_poll_s=0.1)  # fmt: skip
        still = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0)
        async with EdgeAgent(follow) as a, EdgeAgent(still) as b:
            assert a.updates is not None
            v1_hash = a.runner.weights_hash
            await _until(lambda: a.updates.version == 1)
            store.rollout("tinycnn", 2, None)
            answers = []
            # requests keep flowing while the delta downloads; each is answered by a matching tail
            while a.runner.weights_hash == v1_hash or len(answers) < 10:
                x = request_input(a.runner.loaded, len(answers))
                answers.append((a.runner.weights_hash, await a.infer(x)))
                assert time.monotonic() < start + 90
                await asyncio.sleep(0.02)
            assert all(ans.ok and ans.source == "cloud" for _, ans in answers), [ans.error for _, ans in answers]
            assert a.runner.weights_hash == state_hash(_finetuned()) and a.updates.version == 2
            # the new head and the v2 tail answer as the v2 model does, in one piece
            x = request_input(a.runner.loaded, 999)
            ans = await a.infer(x)
            want = v2.module(x)
            assert torch.allclose(next(iter(ans.outputs.values())), want, atol=1e-4)
            # only fc travelled
            total = store.manifest("tinycnn", 2)[0].total_bytes
            assert 0 < a.updates.counters["bytes_downloaded"] < total / 10
            # an edge that does not follow still has its v1 tail served during the rollout
            assert (await b.infer(x)).source == "cloud"
            assert b.runner.weights_hash == v1_hash
            status = a.status  # advertise is off: /status fields from the same function
            from splitinfer.edge.status import agent_status

            view = agent_status(a)
            assert status is None and view["model_version"]["version"] == 2 and view["model_hash"] == a.runner.weights_hash

    start = time.monotonic()
    asyncio.run(go())


def test_edge_refuses_wrongly_signed_and_tampered_updates(cloud_process, store: ModelStore, keys) -> None:
    # the worker trusts no key (it serves whatever is in its store): the edge must refuse
    store.publish("tinycnn", "tinycnn", _finetuned(0.5), keys[2], "signed by a stranger")  # v3
    store.rollout("tinycnn", 2, None)
    store.rollout("tinycnn", 1, None)  # current 1, previous 2: the worker builds v2 at start
    w = cloud_process("-m", "tinycnn", "--store", str(store.root))

    async def go() -> None:
        cfg = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0,
                          follow_updates=True, trust=(str(keys[1]),), update_poll_s=0.1)  # fmt: skip
        async with EdgeAgent(cfg) as a:
            before = a.runner.weights_hash
            store.rollout("tinycnn", 3, None)
            await _until(lambda: a.updates.counters["refusals"] >= 1)
            assert "not signed by a trusted key" in a.updates.counters["last_error"]
            assert a.updates.counters["bytes_downloaded"] == 0
            for i in range(3):
                ans = await a.infer(request_input(a.runner.loaded, i))
                assert ans.ok and ans.source == "cloud"  # the previous version's tail still answers it
            assert a.runner.weights_hash == before
            # a tampered tensor of a correctly signed version (on disk after the worker read it):
            # refused by the edge after download, nothing changes
            path = store.tensors_path("tinycnn", 2)
            bad = load_tensors(path)
            bad["fc.weight"] = bad["fc.weight"] * 2
            save_tensors(path, bad)
            store.rollout("tinycnn", 2, None)
            await _until(lambda: a.updates.counters["refusals"] >= 2)
            assert "fc.weight" in a.updates.counters["last_error"]
            assert a.runner.weights_hash == before and a.updates.take_staged() is None

    asyncio.run(go())


def _broken() -> dict[str, torch.Tensor]:
    """A deliberately broken version: the classifier's rows reversed (top-1 moves for most inputs)."""
    state = {k: v.clone() for k, v in load_model("tinycnn").module.state_dict().items()}
    state["fc.weight"] = state["fc.weight"].flip(0).contiguous() * 3
    state["fc.bias"] = state["fc.bias"].flip(0).contiguous()
    return state


def _bucket(agent_id: str) -> int:
    import hashlib

    return int(hashlib.sha256(agent_id.encode()).hexdigest()[:8], 16) % 10000


def test_canary_that_disagrees_is_rolled_back_automatically(cloud_process, store: ModelStore, keys) -> None:
    store.publish("tinycnn", "tinycnn", _broken(), keys[0], "broken on purpose")  # v3
    w = cloud_process("-m", "tinycnn", "--store", str(store.root), "--trust", str(keys[1]))

    async def go() -> None:
        cfg = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0,
                          follow_updates=True, trust=(str(keys[1]),), update_poll_s=0.1)  # fmt: skip
        async with EdgeAgent(cfg) as e1, EdgeAgent(cfg) as e2:
            canary, other = sorted((e1, e2), key=lambda a: _bucket(a.agent_id))
            assert _bucket(canary.agent_id) < _bucket(other.agent_id)
            percent = (_bucket(canary.agent_id) + 1) / 100  # the canary edge is in, the other is not
            v1_hash = canary.runner.weights_hash
            await _until(lambda: canary.updates.version == 1 and other.updates.version == 1)
            store.rollout("tinycnn", 3, percent, max_disagreement=0.2, min_requests=10)
            switched = False
            answers = []
            deadline = time.monotonic() + 90
            while not (switched and "stopped" in store.state("tinycnn") and canary.runner.weights_hash == v1_hash):
                assert time.monotonic() < deadline, (store.state("tinycnn"), canary.updates.describe())
                switched = switched or canary.runner.weights_hash == state_hash(_broken())
                for agent in (canary, other):
                    answers.append(await agent.infer(request_input(agent.runner.loaded, len(answers))))
                assert other.runner.weights_hash == v1_hash  # never switches: not in the canary
                await asyncio.sleep(0.01)
            assert all(a.ok and a.source == "cloud" for a in answers), [a.error for a in answers if not a.ok][:3]
            st = store.state("tinycnn")
            assert st["current"] == 1 and st["canary"] is None and st["stopped"]["version"] == 3
            assert canary.updates.version == 1 and canary.updates.previous_version == 3
            # the stopped version is still answered by hash: an edge that had not yet switched
            # back when the canary stopped gets answers, not model_mismatch
            listing = await _until_synced(f"{w.url}/v1/models/tinycnn/versions")
            assert state_hash(_broken()) in listing["serving"] and v1_hash in listing["serving"]
        metrics = _get(f"{w.url}/metrics")[1].decode()
        assert "splitinfer_model_rollbacks_total 1.0" in metrics

    asyncio.run(go())


def test_rollout_under_load_loses_nothing_and_never_mismatches(cloud_process, store: ModelStore, keys) -> None:
    """Two following edges at ~20 req/s each, open loop, through a full rollout."""
    w = cloud_process("-m", "tinycnn", "--store", str(store.root), "--trust", str(keys[1]))
    new_hash = state_hash(_finetuned())

    async def go() -> None:
        cfg = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0,
                          follow_updates=True, trust=(str(keys[1]),), update_poll_s=0.1)  # fmt: skip
        async with EdgeAgent(cfg) as e1, EdgeAgent(cfg) as e2:
            await _until(lambda: e1.updates.version == 1 and e2.updates.version == 1)
            tasks: list[asyncio.Task] = []
            published = time.monotonic()
            store.rollout("tinycnn", 2, None)
            deadline = published + 60
            after = 0  # requests sent once both edges switched
            while after < 20:
                assert time.monotonic() < deadline, "the edges did not switch"
                for agent in (e1, e2):
                    tasks.append(asyncio.create_task(agent.infer(request_input(agent.runner.loaded, len(tasks)))))
                if e1.runner.weights_hash == e2.runner.weights_hash == new_hash:
                    after += 1
                await asyncio.sleep(0.05)
            answers = await asyncio.gather(*tasks)
            assert len(answers) >= 40
            bad = [a.error or a.reason for a in answers if not (a.ok and a.source == "cloud")]
            assert bad == [], bad[:3]
            assert e1.updates.counters["updates"] == e2.updates.counters["updates"] == 1

    asyncio.run(go())


def test_follow_updates_over_https_uses_the_agents_tls(cloud_process, store: ModelStore, keys, tmp_path: Path) -> None:
    """--follow-updates against an https worker (token + client certificate required) with
    --tls-ca: the follower uses the agent's TLS context, client certificate and token."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pki import make_pki

    from splitinfer.edge.tls import ClientTLS

    pki = make_pki(tmp_path / "pki")
    w = cloud_process("-m", "tinycnn", "--store", str(store.root), "--trust", str(keys[1]), token="T",
                      tls_cert=str(pki.server), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))  # fmt: skip
    assert w.url.startswith("https://")
    tls = ClientTLS(ca=str(pki.ca), cert=str(pki.client), key=str(pki.client_key))

    async def go() -> None:
        cfg = AgentConfig(model="tinycnn", cloud=w.url, cut="3", warmup=0, token="T", tls=tls,
                          follow_updates=True, trust=(str(keys[1]),), update_poll_s=0.1)  # fmt: skip
        async with EdgeAgent(cfg) as a:
            await _until(lambda: a.updates.version == 1)
            store.rollout("tinycnn", 2, None)
            deadline = time.monotonic() + 60
            while a.runner.weights_hash != state_hash(_finetuned()):  # the switch happens between requests
                assert time.monotonic() < deadline, a.updates.describe()
                assert (await a.infer(request_input(a.runner.loaded, 0))).source == "cloud"
                await asyncio.sleep(0.05)
            ans = await a.infer(request_input(a.runner.loaded, 1))
            assert ans.ok and ans.source == "cloud"
            assert a.runner.weights_hash == state_hash(_finetuned()) and a.updates.version == 2
            assert a.updates.counters["refusals"] == 0 and a.updates.counters["bytes_downloaded"] > 0

    asyncio.run(go())
