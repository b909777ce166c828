"""The `splitinfer` command line. Each command is a thin layer over the library.

User mistakes (UserError) end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitinfer.errors import UserError
from splitinfer.util.options import ModelOpt, require_positive
from splitinfer.util.output import emit_json

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Split inference: cut a PyTorch model between an edge device and a cloud worker.",
)

console = Console()
err_console = Console(stderr=True)

# --------------------------------------------------------------------------- models
@app.command("models")
def models_cmd(json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the built-in models (and the zoo LMs) with their parameters and FLOPs."""
    from splitinfer.models.loader import builtin_models, count_flops, count_parameters, load_model

    rows = []
    for info in builtin_models():
        lm = load_model(info.name)
        rows.append(
            {
                "name": info.name,
                "input_shape": list(info.input_shape),
                "classes": info.num_classes,
                "params": count_parameters(lm.module),
                "flops": count_flops(lm.module, lm.example_input),
                "description": info.description,
            }
        )
    from splitinfer.models.lmzoo import lm_catalog_rows

    rows.extend(lm_catalog_rows())  # the byte LMs (input: up to max_ctx byte tokens)
    if json_out:
        emit_json({"models": rows})
        return
    table = Table(title="built-in models")
    for col in ("name", "input", "params", "GFLOPs", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            "x".join(map(str, r["input_shape"])),
            f"{r['params'] / 1e6:.2f} M",
            f"{r['flops'] / 1e9:.3f}",
            r["description"],
        )
    console.print(table)


# -------------------------------------------------------------------------- profile
@app.command("profile")
def profile_cmd(
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="where to write the profile JSON"),
    threads: int = typer.Option(1, "--threads", help="torch intra-op threads (the device's cores)"),
    batch: int = typer.Option(1, "--batch", help="batch size to profile at"),
    repeats: int = typer.Option(10, "--repeats", help="timed forward passes (median is kept)"),
    warmup: int = typer.Option(2, "--warmup", help="untimed passes first"),
    slowdown: float = typer.Option(1.0, "--slowdown", help="write a profile of a device K times slower"),
    power: Optional[str] = typer.Option(None, "--power", help="record this device's power profile: a JSON file or a device class (phone, jetson, rpi, laptop)"),
) -> None:
    """Measure every node's latency and output bytes on this device."""
    from rich.progress import Progress

    from splitinfer.models.loader import load_model, weights_hash
    from splitinfer.core.profiler import profile_model

    for name, value in (("--threads", threads), ("--batch", batch), ("--repeats", repeats), ("--slowdown", slowdown)):
        require_positive(name, value)
    lm = load_model(model)
    started = time.perf_counter()
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(f"profiling {lm.name}", total=warmup + repeats)
        prof = profile_model(
            lm.name,
            lm.module,
            lm.example_batch(batch),
            threads=threads,
            repeats=repeats,
            warmup=warmup,
            weights_hash=weights_hash(lm.module),
            progress=lambda done, total: bar.update(task, completed=done),
        )
    if slowdown != 1.0:
        prof = prof.scaled(slowdown)
    prof = _with_device_facts(prof, lm, batch, power)
    prof.save(out)
    err_console.print(
        f"{lm.name}: {len(prof.graph)} nodes, {prof.total_ms:.1f} ms per pass "
        f"({threads} thread(s), batch {batch}) measured in {time.perf_counter() - started:.1f} s -> {out}"
    )
    if lm.multi_input:  # the profile's input_shape is the first input's; say what the others are
        shapes = ", ".join(f"{k} {str(t.dtype).replace('torch.', '')} {list(t.shape[1:])}" for k, t in lm.example_inputs.items())
        err_console.print(f"  inputs: {shapes}")


@app.command("scale")
def scale_cmd(
    profile: Path = typer.Argument(..., help="a profile JSON"),
    factor: float = typer.Option(..., "--slowdown", help="K: the new device is K times slower"),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """Write a copy of a profile for a device K times slower (or faster, K < 1)."""
    from splitinfer.core.profile import Profile

    Profile.load(profile).scaled(factor).save(out)


def _with_device_facts(prof: Any, lm: Any, batch: int, power: str | None) -> Any:
    """The profile with each node's weight bytes (for --edge-memory-mb) and, given, the power profile."""
    from dataclasses import replace

    from splitinfer.core.energy import load_power
    from splitinfer.core.graph import capture
    from splitinfer.core.memory import node_weight_bytes

    gm, graph = capture(lm.module, lm.example_batch(batch))
    meta = dict(prof.meta)
    if power is not None:
        meta["power"] = load_power(power).to_json()
    return replace(prof, node_weight_bytes=node_weight_bytes(gm, graph) if graph.names == prof.graph.names else {},
                   meta=meta)  # fmt: skip


# ------------------------------------------------------------------------ partition
def _load_checked_profiles(model: str, edge_profile: Path, cloud_profile: Path) -> tuple[Any, Any]:
    """The pair of profile files, checked to be of this model's graph (the planner's load_pair)."""
    from splitinfer.adapt.planner import load_pair
    from splitinfer.core.graph import capture
    from splitinfer.core.profile import Profile
    from splitinfer.models.loader import load_model

    lm = load_model(model)
    batch = Profile.load(edge_profile).batch  # the graph is traced at the profiles' batch size
    _, graph = capture(lm.module, lm.example_batch(batch))
    return load_pair(edge_profile, cloud_profile, graph.fingerprint(), model=f"{lm.name} {list(lm.input_shape)}")


@app.command("partition")
def partition_cmd(
    model: str = ModelOpt,
    edge_profile: Path = typer.Option(..., "--edge-profile", help="profile JSON measured on the edge"),
    cloud_profile: Path = typer.Option(..., "--cloud-profile", help="profile JSON measured in the cloud"),
    bandwidth: float = typer.Option(..., "--bandwidth", help="uplink, Mbit/s"),
    rtt: float = typer.Option(20.0, "--rtt", help="round-trip time, ms"),
    downlink: Optional[float] = typer.Option(None, "--downlink", help="downlink, Mbit/s (default: the uplink)"),
    envelope: bool = typer.Option(False, "--envelope", help="also list the cuts optimal for 0.05..10000 Mbit/s"),
    compression: str = typer.Option("none", "--compression", help="activations on the wire: none, fp16, int8 (+lz4/zstd): measured bytes and codec time count"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    objective: str = typer.Option("latency", "--objective", help="minimise latency, energy (the edge device's) or edp (energy x latency)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="a constraint: the objective's best cut predicted within this latency"),
    edge_memory_mb: Optional[float] = typer.Option(None, "--edge-memory-mb", help="only cuts whose head weights + peak activations fit in this"),
    power: Optional[str] = typer.Option(None, "--power", help="the edge's power profile, a JSON file or a device class (default: the edge profile's, else phone)"),
    link_type: Optional[str] = typer.Option(None, "--link-type", help="the radio the energy model charges: 3g, 4g, wifi, ethernet"),
) -> None:
    """Choose the cut with the lowest predicted latency (or energy, EDP) for a link."""
    from splitinfer.wire.codec_cost import model_codec_cost
    from splitinfer.wire.codec import parse_compression
    from splitinfer.core.costmodel import Link
    from splitinfer.models.loader import load_model
    from splitinfer.core.partitioner import Partitioner

    link = Link(uplink_mbit=bandwidth, rtt_ms=rtt, downlink_mbit=downlink)
    try:
        parse_compression(compression)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    edge, cloud = _load_checked_profiles(model, edge_profile, cloud_profile)
    codec = model_codec_cost(load_model(model), compression)
    objective_kw = _objective_options(model, edge, objective, deadline_ms, edge_memory_mb, power, link_type)
    started = time.perf_counter()
    plan = Partitioner(edge, cloud, codec, **objective_kw).plan(link, envelope=envelope)
    elapsed_ms = (time.perf_counter() - started) * 1e3
    if json_out:
        d = plan.to_json()
        d["partition_ms"] = round(elapsed_ms, 3)
        emit_json(d)
        return
    c = plan.cut
    console.print(
        f"[bold]{plan.model}[/]: best cut [bold]{c.id}[/] ({c.kind}), "
        f"predicted {plan.predicted_ms:.2f} ms at {bandwidth:g} Mbit/s, {rtt:g} ms RTT"
    )
    console.print(f"  sends {c.bytes:,} bytes in {len(c.tensors)} tensor(s): {', '.join(c.tensors) or '-'}")
    console.print("  " + ", ".join(f"{k} {v:.2f}" for k, v in c.breakdown.to_json().items()))
    if c.energy is not None:
        console.print(f"  energy {c.energy_mj:.1f} mJ ({plan.objective}): " + ", ".join(f"{k} {v:.1f}" for k, v in c.energy.to_json().items()))
    table = Table(title="best candidates along the model")
    for col in ("index", "kind", "tensors", "bytes", "predicted ms"):
        table.add_column(col, justify="right" if col in ("index", "bytes", "predicted ms") else "left")
    for cand in sorted(plan.candidates, key=lambda x: x.predicted_ms)[:10]:
        table.add_row(str(cand.index), cand.kind, ", ".join(cand.tensors)[:60], f"{cand.bytes:,}", f"{cand.predicted_ms:.2f}")
    console.print(table)
    if plan.envelope:
        env = Table(title="envelope: the winning cut per uplink range")
        for col in ("from Mbit/s", "to Mbit/s", "cut", "kind", "bytes"):
            env.add_column(col)
        for e in plan.envelope:
            env.add_row(f"{e.from_mbit:.3g}", f"{e.to_mbit:.3g}", e.cut.id[:60], e.cut.kind, f"{e.cut.bytes:,}")
        console.print(env)


def _objective_options(
    model: str, edge: Any, objective: str, deadline_ms: float | None, edge_memory_mb: float | None,
    power: str | None, link_type: str | None,
) -> dict[str, Any]:
    """The Partitioner's objective, deadline, power and memory from the partition options."""
    from splitinfer.core.energy import OBJECTIVES, load_power
    from splitinfer.core.memory import MemoryBudget
    from splitinfer.core.partitioner_objective import power_of

    if objective not in OBJECTIVES:
        raise UserError(f"unknown --objective {objective!r}: use {', '.join(OBJECTIVES)}")
    require_positive("--deadline-ms", deadline_ms)
    pw = load_power(power) if power is not None else power_of(edge)
    if link_type is not None:
        pw = pw.on(link_type)
    memory = None
    if edge_memory_mb is not None:
        weights = edge.node_weight_bytes
        if not weights:  # an older profile: the model itself says what each node weighs
            from splitinfer.core.graph import capture
            from splitinfer.core.memory import node_weight_bytes
            from splitinfer.models.loader import load_model

            lm = load_model(model)
            gm, graph = capture(lm.module, lm.example_batch(edge.batch))
            weights = node_weight_bytes(gm, graph)
        memory = MemoryBudget.of_mb(edge_memory_mb, weights)
    return {"objective": objective, "deadline_ms": deadline_ms, "power": pw, "memory": memory}


# -------------------------------------------------------------------------- inspect
@app.command("inspect")
def inspect_cmd(
    model: str = ModelOpt,
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check head+tail against the full model"),
) -> None:
    """Show every candidate cut with its crossing tensors and check each split."""
    from splitinfer.core.verify import inspect_model
    from splitinfer.models.loader import load_model

    lm = load_model(model)
    report = inspect_model(lm.name, lm.module, lm.example_input, verify=verify)
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"{lm.name}: {len(report['candidates'])} candidate cuts")
    for col in ("index", "kind", "tensors", "bytes", "max abs diff"):
        table.add_column(col)
    for c in report["candidates"]:
        diff = c["max_abs_diff"]
        table.add_row(
            str(c["index"]), c["kind"], ", ".join(c["tensors"])[:60], f"{c['bytes']:,}",
            "-" if diff is None else f"{diff:.2e}",
        )
    console.print(table)
    if verify:
        worst = max((c["max_abs_diff"] for c in report["candidates"]), default=0.0)
        ok = worst <= report["tolerance"]
        console.print(f"{'[green]all splits match[/]' if ok else '[red]MISMATCH[/]'}: worst max abs diff {worst:.2e}")
        if not ok:
            raise typer.Exit(1)


# ------------------------------------------------------------------------ reference
@app.command("reference")
def reference_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="folder to write <model>/{edge,cloud,plan}.json into"),
    models: Optional[str] = typer.Option(None, "--models", help="comma-separated (default: all built-in)"),
    edge_threads: int = typer.Option(1, "--edge-threads"),
    cloud_threads: int = typer.Option(2, "--cloud-threads"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Profile built-in models as edge and cloud on this machine; write profiles, plans, a summary."""
    from splitinfer.adapt.reference import build_reference, summary_markdown

    names = [m.strip() for m in models.split(",")] if models else None
    summary = build_reference(
        out, names, edge_threads=edge_threads, cloud_threads=cloud_threads,
        progress=lambda msg: err_console.print(msg, highlight=False),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if json_out:
        emit_json(summary)
    else:
        sys.stdout.write(summary_markdown(summary))


# ------------------------------------------------------------------------------- ls
@app.command("ls")
def ls_cmd(
    timeout: float = typer.Option(2.0, "--timeout", help="seconds to listen for announcements"),
    interface: Optional[str] = typer.Option(None, "--interface", help="address to browse on"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    tls_ca: Optional[str] = typer.Option(None, "--tls-ca", help="check https workers' certificates against this PEM CA"),
) -> None:
    """Running cloud workers and edge agents on this network (mDNS)."""
    import asyncio

    from splitinfer.discovery.mdns import browse_all

    require_positive("--timeout", timeout)
    found = asyncio.run(browse_all(timeout, interface))
    checked: dict[str, str] = {}
    if tls_ca:  # each https worker's certificate, checked on a real handshake
        from splitinfer.edge.tls import ClientTLS, check_certificates

        checked = asyncio.run(check_certificates([(p.url, p.pin) for p in found["clouds"]], ClientTLS(ca=tls_ca)))
    clouds = []
    for p in found["clouds"]:
        d = p.to_json()
        d["models"] = [{"id": mid, "hash": h} for mid, h in p.models().items()]
        if p.url in checked:
            d["tls"] = checked[p.url]
        clouds.append(d)
    edges = [p.to_json() for p in found["edges"]]
    if json_out:
        emit_json({"clouds": clouds, "edges": edges})
        return
    table = Table(title=f"cloud workers ({len(clouds)})")
    for col in ("name", "url", "models", "token", "load", "tls"):
        table.add_column(col)
    for c in clouds:
        table.add_row(c["name"], c["url"], ", ".join(f"{m['id']}:{m['hash']}" for m in c["models"]),
                      "yes" if c.get("auth") == "1" else "no", c.get("load", "?"),
                      c.get("tls", "https" if c.get("scheme") == "https" else "-"))
    console.print(table)
    table = Table(title=f"edge agents ({len(edges)})")
    for col in ("name", "url", "model", "version", "cut", "state", "cloud"):
        table.add_column(col)
    for e in edges:
        table.add_row(e["name"], e["url"], e.get("model", ""), str(e.get("version") or "-"), e.get("cut", ""),
                      e.get("state", ""), e.get("cloud", ""))  # fmt: skip
    console.print(table)


def _register_service_commands() -> None:
    """Command groups whose code lives with their package (services, training, benchmarks, demo)."""
    from splitinfer.cloud.cli import cloud_cmd

    from splitinfer.edge.cli import edge_cmd
    from splitinfer.simulations.cli import emulate_cmd, experiment_cmd, simulate_cmd
    from splitinfer.demo.cli import demo_cmd
    from splitinfer.train.cli import distill_cmd, evaluate_cmd, train_cmd
    from splitinfer.bench.cli import bench_app

    app.command("cloud")(cloud_cmd)
    app.command("edge")(edge_cmd)
    app.command("simulate")(simulate_cmd)
    app.command("experiment")(experiment_cmd)
    app.command("emulate")(emulate_cmd)
    app.command("train")(train_cmd)
    app.command("distill")(distill_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("demo")(demo_cmd)
    app.add_typer(bench_app, name="bench")
    from splitinfer.edge.gen_cli import generate_cmd

    app.command("generate")(generate_cmd)
    from splitinfer.cloud.update_cli import register as register_updates
    register_updates(app)
    from splitinfer.cloud.federate_cli import register as register_federate
    register_federate(app)


_register_service_commands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
