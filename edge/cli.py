"""`splitinfer edge`: run requests through the head here and a cloud worker's tail.

A thin layer over :class:`splitinfer.edge.agent.EdgeAgent`; user mistakes end in a
UserError (one line, exit code 2), registered by ``splitinfer.cli``.
:func:`run_edge_command` runs the same command with :class:`AgentHooks` (the network
emulation's edge launcher), without going through the top-level CLI.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitinfer.edge.fallback import default_fallback
from splitinfer.edge.hooks import AgentHooks
from splitinfer.errors import UserError
from splitinfer.util.output import emit_json
from splitinfer.util.stats import latency_stats

__all__ = ["default_fallback", "edge_cmd", "run_agent", "run_edge_command"]


async def run_agent(
    config: Any, requests: int, rate: float | None, hooks: AgentHooks | None = None
) -> dict[str, Any]:
    """Start an agent, run the requests, return the summary."""
    from dataclasses import replace

    from splitinfer.edge.agent import EdgeAgent
    from splitinfer.edge.learn import learning, resolve_superlink

    if getattr(config, "learn", False) and config.federate:  # `--federate mdns`: browse off the loop
        found = await asyncio.to_thread(resolve_superlink, config.federate, config.fallback, config.interface)
        config = replace(config, federate=found)
    with learning(config, hooks) as hooks:  # --learn / --federate (issue 18)
        async with EdgeAgent(config, hooks) as agent:
            return await agent.run(requests, rate)


def run_edge_command(argv: list[str], hooks: AgentHooks | None = None) -> None:
    """`splitinfer edge ARGV...` with these hooks in its agent; exits like the CLI
    (UserError: one line on stderr, exit code 2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False)
    app.command()(edge_cmd)
    try:
        app(args=list(argv), prog_name="splitinfer edge", obj=hooks)
    except UserError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def edge_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="built-in name, path/to/file.py:function or package.module:function"),
    cloud: Optional[list[str]] = typer.Option(None, "--cloud", help="a cloud worker's URL (repeatable); default: discover over mDNS"),
    discover: Optional[bool] = typer.Option(None, "--discover/--no-discover", help="find workers over mDNS (default: when no --cloud)"),
    interface: Optional[str] = typer.Option(None, "--interface", help="address to browse and advertise on"),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="model answering when the cloud cannot (default: the model's student)"),
    no_fallback: bool = typer.Option(False, "--no-fallback", help="no local fallback: failures are errors"),
    progressive: bool = typer.Option(False, "--progressive", help="answer from the fallback at once, refine with the cloud"),
    confidence_exit: Optional[float] = typer.Option(None, "--confidence-exit", help="skip the cloud when the fallback's top-1 probability >= P"),
    no_advertise: bool = typer.Option(False, "--no-advertise", help="do not announce this agent on mDNS / serve /status"),
    wait_s: float = typer.Option(5.0, "--wait", help="seconds to wait for a first cloud worker at start"),
    cut: str = typer.Option("auto", "--cut", help="auto, edge, cloud, a cut index or tensor names joined by ','"),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="uplink in Mbit/s for --cut auto (default: measured)"),
    rtt: Optional[float] = typer.Option(None, "--rtt", help="round trip in ms for --cut auto (default: measured)"),
    requests: int = typer.Option(20, "--requests", "-n", help="requests to send"),
    rate: Optional[float] = typer.Option(None, "--rate", help="arrivals per second, open loop (default: one after another)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="end-to-end budget per request"),
    compression: str = typer.Option("none", "--compression", help="activations on the wire: none, fp16, int8"),
    verify: bool = typer.Option(False, "--verify", help="also run the full model here and report max abs diff"),
    token: Optional[str] = typer.Option(None, "--token", envvar="SPLITINFER_TOKEN", help="bearer token of the worker"),
    tls_ca: Optional[str] = typer.Option(None, "--tls-ca", help="PEM CA that signs trusted workers (https)"),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM client certificate (mutual TLS)"),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    tls_pin: Optional[list[str]] = typer.Option(None, "--tls-pin", help="SHA-256 of a trusted worker's certificate (repeatable)"),
    threads: int = typer.Option(1, "--threads", help="torch threads for the head (the edge's cores)"),
    edge_profile: Optional[str] = typer.Option(None, "--edge-profile", help="--cut auto: partition on this edge profile JSON (with --cloud-profile) instead of the bundled one"),
    cloud_profile: Optional[str] = typer.Option(None, "--cloud-profile", help="--cut auto: the cloud profile JSON to go with --edge-profile"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    objective: str = typer.Option("latency", "--objective", help="--cut auto minimises latency, energy or edp (with --deadline-ms: subject to it)"),
    power: Optional[str] = typer.Option(None, "--power", help="this device's power profile: a JSON file or a class (phone, jetson, rpi, laptop)"),
    battery_saver_below: Optional[float] = typer.Option(None, "--battery-saver-below", help="--cut auto: below P percent battery, minimise energy instead"),
    battery_file: Optional[str] = typer.Option(None, "--battery-file", help="file with the battery percentage (default /sys/class/power_supply/*/capacity)"),
    edge_memory_mb: Optional[float] = typer.Option(None, "--edge-memory-mb", help="--cut auto: only heads that fit in M MB; unused weights are dropped"),
    follow_updates: bool = typer.Option(False, "--follow-updates", help="poll the cloud for signed model versions; switch between requests"),
    trust: Optional[list[str]] = typer.Option(None, "--trust", help="Ed25519 public key (PEM) updates must be signed by (repeatable)"),
    learn: bool = typer.Option(False, "--learn", help="keep a bounded local buffer of inputs with the cloud's answers (never sent)"),
    learn_dir: Optional[str] = typer.Option(None, "--learn-dir", help="where --learn saves its buffer on this device"),
    federate: Optional[str] = typer.Option(None, "--federate", help="join this Flower SuperLink (host:port, or mdns: the one announced over mDNS, preferring one training --fallback) as a SuperNode; needs --learn"),
) -> None:
    """Run requests with the head on this machine and the tail on a cloud worker."""
    from splitinfer.edge.agent import AgentConfig
    from splitinfer.edge.tls import ClientTLS

    if requests < 1:
        raise UserError(f"--requests must be at least 1, got {requests}")
    if rate is not None and not rate > 0:
        raise UserError(f"--rate must be positive, got {rate}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    clouds = tuple(cloud or ())
    config = AgentConfig(
        model=model,
        follow_updates=follow_updates,
        trust=tuple(trust or ()),
        learn=learn,
        learn_dir=learn_dir,
        federate=federate,
        cloud=clouds[0] if clouds else None,
        clouds=clouds[1:],
        discover=(not clouds) if discover is None else discover,
        interface=interface,
        fallback=None if no_fallback else (fallback or default_fallback(model)),
        progressive=progressive,
        confidence_exit=confidence_exit,
        advertise=not no_advertise,
        start_wait_s=wait_s,
        token=token,
        tls=ClientTLS(ca=tls_ca, cert=tls_cert, key=tls_key, pins=tuple(tls_pin or ())),
        cut=cut,
        bandwidth_mbit=bandwidth,
        rtt_ms=rtt,
        deadline_ms=deadline_ms,
        compression=compression,
        verify=verify,
        threads=threads,
        edge_profile=edge_profile,
        cloud_profile=cloud_profile,
        objective=objective,
        power=power,
        battery_saver_below=battery_saver_below,
        battery_file=battery_file,
        edge_memory_mb=edge_memory_mb,
    )
    hooks = ctx.obj if isinstance(ctx.obj, AgentHooks) else None  # run_edge_command's
    summary = asyncio.run(run_agent(config, requests, rate, hooks))
    if json_out:
        emit_json(summary)
        return
    _print_summary(summary, model, verify)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_summary(summary: dict[str, Any], model: str, verify: bool) -> None:
    console = Console()
    cut = summary["cut"]
    index = "" if cut.get("index") is None else f" (index {cut['index']})"
    line = f"[bold]{model}[/]: cut [bold]{cut['id'][:80]}[/]{index}, {cut['kind']}, {cut['bytes']:,} bytes raw"
    if cut.get("chosen_by") == "auto":
        link = cut["link"]
        line += (
            f"; chosen for {link['uplink_mbit']:.1f} Mbit/s, {link['rtt_ms']:.2f} ms RTT"
            f"{' (measured)' if link.get('measured') else ''}, predicted {cut['predicted_ms']:.2f} ms"
        )
    console.print(line, highlight=False)

    table = Table(title=f"{summary['answered']}/{summary['requests']} answered, {summary['errors']} error(s)")
    for col in ("source", "requests", "mean ms", "p50 ms", "p95 ms", "max ms"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, count in summary["by_source"].items():
        if count:
            st = latency_stats([r["total_ms"] for r in summary["records"] if r["source"] == source and "error" not in r])
            table.add_row(source, str(count), _ms(st["mean"]), _ms(st["p50"]), _ms(st["p95"]), _ms(st["max"]))
    lat = summary["latency_ms"]
    table.add_row("[bold]all answered[/]", str(summary["answered"]), _ms(lat["mean"]), _ms(lat["p50"]), _ms(lat["p95"]), _ms(lat["max"]))
    console.print(table)

    records = [r for r in summary["records"] if "error" not in r]
    if records:
        parts = Table(title="mean time per stage (ms)")
        keys = ("head_ms", "encode_ms", "network_ms", "cloud_queue_ms", "cloud_compute_ms", "total_ms")
        for k in keys:
            parts.add_column(k.removesuffix("_ms").replace("_", " "), justify="right")
        parts.add_row(*(f"{sum(r[k] for r in records) / len(records):.2f}" for k in keys))
        console.print(parts)
        mean_bytes = sum(r["bytes_sent"] for r in records) / len(records)
        console.print(f"sent {mean_bytes:,.0f} bytes per request", highlight=False)
    if verify and records:
        worst = max(r.get("max_abs_diff", 0.0) for r in records)
        console.print(f"verify: worst max abs diff against the full local model {worst:.2e}", highlight=False)
    errors = [r["error"] for r in summary["records"] if "error" in r]
    if errors:
        first = errors[0]
        console.print(f"[red]{len(errors)} error(s)[/], first: {first['code']}: {first['message']}", highlight=False)
