"""`splitinfer bench ...`: the benchmark commands. Each prints a rich table, or one JSON
object with --json; the measuring lives in the modules beside this one."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from splitinfer.bench.generate_cli import generate_cmd
from splitinfer.bench.soak_cli import soak_cmd
from splitinfer.errors import UserError
from splitinfer.util.options import ModelOpt, require_positive
from splitinfer.util.output import emit_json

__all__ = ["bench_app"]

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON.")
console = Console()

@bench_app.command("codec")
def bench_codec_cmd(
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    sizes: str = typer.Option("1,10,100", "--sizes", help="tensor sizes in MB"),
) -> None:
    """Encode+decode throughput of this codec vs pickle protocol 5 and torch.save."""
    from splitinfer.bench.codec import run_codec_bench

    try:
        size_list = tuple(int(s) for s in sizes.split(","))
    except ValueError:
        raise UserError(f"--sizes must be comma-separated integers, got {sizes!r}") from None
    result = run_codec_bench(sizes_mb=size_list)
    if json_out:
        emit_json(result)
        return
    table = Table(title="codec throughput (GB/s)")
    for col in ("codec", "MB", "encode", "decode"):
        table.add_column(col)
    for r in result["results"]:
        table.add_row(r["codec"], str(r["mb"]), f"{r['encode_gbps']:.2f}", f"{r['decode_gbps']:.2f}")
    console.print(table)


@bench_app.command("compression")
def bench_compression_cmd(
    model: str = typer.Option("tinycnn-digits", "--model", "-m", help="model (digits-trained ones are scored on held-out digits)"),
    cuts: int = typer.Option(4, "--cuts", help="cuts to measure, spread along the model"),
    samples: int = typer.Option(128, "--samples", help="inputs per measurement"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Bytes saved, codec time and top-1 agreement of fp16/int8 (+lz4/zstd) activations."""
    from splitinfer.bench.compression import run_compression_bench
    from splitinfer.models.loader import load_model

    require_positive("--cuts", cuts)
    require_positive("--samples", samples)
    lm = load_model(model)
    labels = None
    if lm.name.endswith("digits"):
        from splitinfer.models.data import digits_dataset

        data = digits_dataset(lm.input_shape)
        inputs, labels = data.x_test[:samples], data.y_test[:samples]
    else:
        inputs = lm.example_batch(samples)
    result = run_compression_bench(lm, inputs, cuts=cuts, labels=labels)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['model']}: activation compression on {result['samples']} inputs")
    for col in ("cut", "compression", "wire bytes", "ratio", "enc ms", "dec ms", "top-1 agree", "accuracy"):
        table.add_column(col, justify="left" if col in ("cut", "compression") else "right")
    for r in result["results"]:
        table.add_row(f"{r['index']} {r['cut'][:24]}", r["compression"], f"{r['wire_bytes']:,}", f"{r['ratio']:.3f}",
                      f"{r['encode_ms']:.2f}", f"{r['decode_ms']:.2f}", f"{r['top1_agreement']:.3f}",
                      f"{r['accuracy']:.3f}" if "accuracy" in r else "-")
    console.print(table)


@bench_app.command("confidence")
def bench_confidence_cmd(
    levels: str = typer.Option("none,0.5,0.9,0.99,0.999", "--p", help="confidence-exit thresholds (none: always the cloud)"),
    samples: Optional[int] = typer.Option(None, "--samples", help="held-out digits to use (default: all 359)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Accuracy, latency and cloud traffic of --confidence-exit P on held-out digits."""
    from splitinfer.bench.confidence import run_confidence_bench

    try:
        parsed = tuple(None if v.strip() == "none" else float(v) for v in levels.split(","))
    except ValueError:
        raise UserError(f"--p must be comma-separated numbers or none, got {levels!r}") from None
    if any(p is not None and not 0 < p <= 1 for p in parsed):
        raise UserError("--p values must be in (0, 1]")
    result = run_confidence_bench(levels=parsed, samples=samples)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['model']} with fallback {result['fallback']}, {result['samples']} held-out digits")
    for col in ("P", "accuracy", "mean ms", "p95 ms", "to the cloud", "bytes/request"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row("none" if r["p"] is None else f"{r['p']:g}", f"{r['accuracy']:.4f}", f"{r['mean_ms']:.2f}",
                      f"{r['p95_ms']:.2f}", f"{100 * r['cloud_share']:.1f}%", f"{r['bytes_per_request']:,.0f}")
    console.print(table)


@bench_app.command("cloud")
def bench_cloud_cmd(
    model: str = ModelOpt,
    cut: Optional[int] = typer.Option(None, "--cut", help="prefix cut index (default: mid-network)"),
    concurrency: str = typer.Option("1,8,32", "--concurrency", help="client counts, comma-separated"),
    seconds: float = typer.Option(4.0, "--seconds", help="measured seconds per point"),
    max_batch: int = typer.Option(32, "--max-batch", help="batch limit with batching on"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="batch fill wait with batching on"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    backend: str = typer.Option("local", "--backend", help="backends to measure, comma-separated: local, ray"),
    replicas: str = typer.Option("1", "--replicas", help="ray: replica counts to measure, comma-separated"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: an existing cluster (default: a local Ray)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads of the local worker and of each ray replica (default: torch's / 1)"),
    batching: str = typer.Option("both", "--batching", help="measure with batching off, on, or both"),
    rounds: int = typer.Option(1, "--rounds", help="measure every setup this many times, interleaved; ratios are the median over rounds"),
) -> None:
    """Worker throughput and p50/p95 latency with batching on and off, per backend."""
    from splitinfer.bench.cloud import BenchSettings, run_cloud_bench

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
    except ValueError:
        raise UserError(f"--concurrency must be comma-separated integers, got {concurrency!r}") from None
    if not levels or min(levels) < 1 or seconds <= 0 or max_batch < 1:
        raise UserError("--concurrency values, --seconds and --max-batch must be positive")
    backends = tuple(b.strip() for b in backend.split(",") if b.strip())
    if not backends or any(b not in ("local", "ray") for b in backends):
        raise UserError(f"--backend must be local, ray or both (comma-separated), got {backend!r}")
    try:
        counts = tuple(int(r) for r in replicas.split(","))
    except ValueError:
        raise UserError(f"--replicas must be comma-separated integers, got {replicas!r}") from None
    if not counts or min(counts) < 1:
        raise UserError("--replicas values must be positive")
    require_positive("--threads", threads)
    require_positive("--rounds", rounds)
    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    if batching not in modes:
        raise UserError(f"--batching must be off, on or both, got {batching!r}")
    result = run_cloud_bench(
        BenchSettings(model=model, cut_index=cut, concurrency=levels, seconds=seconds, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, backends=backends, replicas=counts, ray_address=ray_address,
                      threads=threads, batching=modes[batching], rounds=rounds)
    )
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['model']} tail after cut {result['cut']['index']} ({result['cut']['bytes']:,} bytes)")
    for col in ("round", "backend", "replicas", "batching", "clients", "req/s", "p50 ms", "p95 ms", "mean batch"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["round"]), r["backend"], str(r["replicas"]), "on" if r["batching"] else "off", str(r["concurrency"]),
                      f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['mean_batch']:.1f}")
    console.print(table)
    for key, what in (("speedup_at_max_concurrency", "throughput with / without batching"),
                      ("ray_vs_local_at_max_concurrency", "ray (1 replica) / local"),
                      ("two_vs_one_replica_at_max_concurrency", "ray 2 / 1 replicas, batching off")):  # fmt: skip
        if result[key] is not None:
            each = f" (median of rounds {', '.join(str(v) for v in result['per_round'][key])})" if rounds > 1 else ""
            console.print(f"{what} at {max(levels)} clients: {result[key]}x{each}")
    pred = result.get("prediction")
    if pred:
        table = Table(title=f"predicted from one replica's service time {pred['service_ms']} ms, overhead {pred['overhead_ms']} ms")
        for col in ("replicas", "batching", "clients", "req/s predicted", "measured", "p50 ms predicted", "measured"):
            table.add_column(col, justify="right")
        for r in pred["rows"]:
            table.add_row(str(r["replicas"]), "on" if r["batching"] else "off", str(r["concurrency"]),
                          f"{r['predicted_rps']:.1f}", f"{r['measured_rps']:.1f}", f"{r['predicted_p50_ms']:.1f}",
                          f"{r['measured_p50_ms']:.1f}")  # fmt: skip
        console.print(table)



bench_app.command("soak")(soak_cmd)
bench_app.command("generate")(generate_cmd)


@bench_app.command("update")
def bench_update_cmd(
    model: str = typer.Option("tinycnn", "--model", "-m", help="model (the changed layers are tinycnn's)"),
    edges: int = typer.Option(4, "--edges", help="following edge agents"),
    rate: float = typer.Option(10.0, "--rate", help="requests per second per edge during each rollout"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Delta bytes vs the whole model, publish-to-all-switched time, requests lost and fallbacks."""
    from splitinfer.bench.update import run_update_bench

    require_positive("--rate", rate)
    require_positive("--edges", edges)
    result = run_update_bench(model, edges=edges, rate=rate)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"model updates: {model}, {edges} edges at {rate:g} req/s each")
    for col in ("change", "tensors sent", "bytes/edge", "full", "share", "switched (s)", "requests", "lost", "fallbacks"):
        table.add_column(col)
    for name, u in result["updates"].items():
        table.add_row(name, f"{u['tensors_sent']}/{u['tensors']}", f"{u['bytes_per_edge']:,}", f"{u['full_bytes']:,}",
                      f"{u['share']:.2%}", f"{u['publish_to_all_switched_s']:.2f}", str(u["requests"]), str(u["lost"]),
                      str(u["fallbacks"]))  # fmt: skip
    console.print(table)
