"""Real zeroconf on 127.0.0.1: a SuperLink announces its Fleet API, edges find it (issue 18).

Every test but the end-to-end one uses a service type of its own (``_sft-<random>._tcp``), so
records of other tests or runs on this machine cannot answer; instance names are random too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from splitinfer.discovery.federation import (
    FL_SERVICE,
    advertise_federation,
    federation_txt,
    find_federation,
    find_federation_async,
    parse_hostport,
)
from splitinfer.discovery.mdns import MAX_ENTRY_BYTES, MAX_TXT_BYTES, Advertiser, Browser, txt_size
from splitinfer.errors import UserError

LO = "127.0.0.1"  # no test sends multicast off this machine
STUDENT = "student:tinycnn-digits"
pytestmark = pytest.mark.timeout(120)


def _service() -> str:
    return f"_sft-{uuid.uuid4().hex[:8]}._tcp.local."


def test_records_and_addresses_are_checked() -> None:
    txt = federation_txt(STUDENT, 5, "fedprox")
    assert txt == {"model": STUDENT, "rounds": "5", "strategy": "fedprox"}
    long = federation_txt("m" * 300, 5, "fedavg")  # too long for one TXT string: left out, not cut
    assert "model" not in long and txt_size(long) <= MAX_TXT_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_ENTRY_BYTES for k, v in long.items())
    assert parse_hostport("10.0.0.2:9092") == ("10.0.0.2", 9092)
    assert parse_hostport("[::1]:9092") == ("::1", 9092) and parse_hostport("link.lan:1") == ("link.lan", 1)
    for bad in ("10.0.0.2", "10.0.0.2:0", "10.0.0.2:70000", ":9092", "host:port", "::1:9092", "a b:1"):
        with pytest.raises(ValueError):
            parse_hostport(bad)
    for host, port in (("0.0.0.0", 9092), ("224.0.0.251", 9092), ("not-an-ip", 9092), (LO, 0), (LO, 65536)):
        with pytest.raises(ValueError):
            with advertise_federation(host, port, STUDENT, 1, "fedavg", interface=LO, service_type=_service()):
                pass


def test_edge_config_takes_host_port_or_mdns() -> None:
    from splitinfer.edge.agent import AgentConfig
    from splitinfer.edge.learn import resolve_superlink

    AgentConfig(model="tinycnn-digits", cut="edge", learn=True, federate="mdns")
    AgentConfig(model="tinycnn-digits", cut="edge", learn=True, federate="127.0.0.1:9092")
    with pytest.raises(UserError, match="HOST:PORT or mdns"):
        AgentConfig(model="tinycnn-digits", cut="edge", learn=True, federate="127.0.0.1")
    assert resolve_superlink("10.0.0.2:9092", STUDENT) == "10.0.0.2:9092"  # no mDNS for a given address


def test_an_announced_federation_is_found_with_its_address() -> None:
    service = _service()
    with advertise_federation(LO, 45678, STUDENT, 3, "fedavg", interface=LO, service_type=service):
        started = time.monotonic()
        assert find_federation(STUDENT, 10.0, LO, service) == f"{LO}:45678"
        assert time.monotonic() - started < 5.0  # the wanted model answers: no waiting out the timeout
        assert find_federation(None, 10.0, LO, service) == f"{LO}:45678"  # no fallback: the first seen


def test_the_agents_model_is_preferred_over_the_first_seen() -> None:
    service = _service()
    with advertise_federation(LO, 45001, "student:other", 1, "fedavg", interface=LO, service_type=service):
        with advertise_federation(LO, 45002, STUDENT, 1, "fedprox", interface=LO, service_type=service):
            for _ in range(2):  # not luck of arrival order
                assert find_federation(STUDENT, 10.0, LO, service) == f"{LO}:45002"
                assert find_federation("student:other", 10.0, LO, service) == f"{LO}:45001"
            # nobody trains this model: one of them, after a short grace, well within the wait
            started = time.monotonic()
            assert find_federation("student:nobody", 10.0, LO, service) in (f"{LO}:45001", f"{LO}:45002")
            assert time.monotonic() - started < 6.0


async def test_records_with_a_bad_port_or_address_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    service = _service()
    hostile = [  # (address, port, TXT): what a careless or hostile announcer might send
        ("0.0.0.0", 45010, {"model": STUDENT}),
        ("224.0.0.251", 45011, {"model": STUDENT}),
        ("255.255.255.255", 45012, {"model": STUDENT}),
        (LO, 0, {"model": STUDENT, "rounds": "lots"}),
    ]
    ads = [Advertiser(service, f"bad-{i}-{uuid.uuid4().hex[:8]}", host, port, LO) for i, (host, port, _) in enumerate(hostile)]
    await asyncio.gather(*(ad.start(txt) for ad, (_, _, txt) in zip(ads, hostile)))
    good = Advertiser(service, f"good-{uuid.uuid4().hex[:8]}", LO, 45013, LO)
    try:
        with pytest.raises(UserError, match="no Flower SuperLink found over mDNS within 3 s"):
            await find_federation_async(STUDENT, 3.0, LO, service)  # only unusable records answer
        skipped = {r.getMessage().split("'")[1] for r in caplog.records if r.getMessage().startswith("skipping federation")}
        assert skipped == {ad.instance for ad in ads}  # each one was seen, and refused
        await good.start({"model": "student:other", "junk": "\u00ff" * 40})
        # the unusable records claim the wanted model; the usable one (another model) is chosen
        assert await find_federation_async(STUDENT, 10.0, LO, service) == f"{LO}:45013"
    finally:
        for ad in [*ads, good]:
            await ad.stop()


def test_nothing_announced_is_a_user_error_within_the_wait() -> None:
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        find_federation(STUDENT, 2.0, LO, _service())
    elapsed = time.monotonic() - started
    assert str(err.value) == "no Flower SuperLink found over mDNS within 2 s; pass --federate HOST:PORT"
    assert 2.0 <= elapsed < 2.0 + 8.0  # the whole wait, then zeroconf's close, not more


async def test_the_announcement_is_withdrawn_when_the_block_ends() -> None:
    service = _service()
    browser = Browser(service, "federation", LO)
    await browser.start()
    announcement = advertise_federation(LO, 45020, STUDENT, 1, "fedavg", interface=LO, service_type=service)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(announcement.__enter__)  # the sync context manager, off this loop
        try:
            deadline = loop.time() + 15
            while not any(p.url.endswith(":45020") for p in browser.peers.values()):
                assert loop.time() < deadline, "announcement not seen"
                browser.changed.clear()
                try:
                    await asyncio.wait_for(browser.changed.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            assert next(iter(browser.peers.values())).properties["model"] == STUDENT
        finally:
            await asyncio.to_thread(announcement.__exit__, None, None, None)
        deadline = loop.time() + 10  # the goodbye, not a TTL of minutes
        while browser.peers:
            assert loop.time() < deadline, "announcement not withdrawn"
            browser.changed.clear()
            try:
                await asyncio.wait_for(browser.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        await browser.stop()


def test_superlink_announces_its_fleet_address_and_an_edge_finds_it(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from splitinfer.cloud.federate_run import SuperLinkProcess, announce_host
    from splitinfer.edge.learn import resolve_superlink

    with pytest.raises(UserError, match="--interface 127.0.0.2 is announced"):
        announce_host(LO, "127.0.0.2")
    assert announce_host("0.0.0.0", "127.0.0.2") == "127.0.0.2" and announce_host("localhost") == LO
    with SuperLinkProcess(tmp_path / "server", host=LO) as link:
        assert link.advertise(STUDENT, 2, "fedprox", interface=LO) == link.address
        started = time.monotonic()
        assert find_federation(STUDENT, 10.0, LO, FL_SERVICE) == link.address
        assert resolve_superlink("mdns", STUDENT, LO) == link.address  # what `--federate mdns` joins
        assert time.monotonic() - started < 10.0
    with pytest.raises(UserError, match="pass --federate HOST:PORT"):  # stopped: withdrawn with the SuperLink
        resolve_superlink("mdns", STUDENT, LO, wait_s=2.0)
