"""`splitinfer bench soak`: the command line of :mod:`splitinfer.bench.soak`."""

from __future__ import annotations

import typer
from rich.console import Console

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

__all__ = ["soak_cmd"]

console = Console()


def soak_cmd(
    model: str = typer.Option("tinycnn", "--model", "-m", help="model the worker serves"),
    clients: int = typer.Option(32, "--clients", help="closed-loop WebSocket clients"),
    seconds: float = typer.Option(180.0, "--seconds", help="length of the load phase"),
    attack: bool = typer.Option(True, "--attack/--no-attack", help="then a never-reading client, heavy requests, bombs"),
    heavy: int = typer.Option(5000, "--heavy", help="heavy requests in the attack"),
    rss_cap_mb: float = typer.Option(1536.0, "--rss-cap-mb", help="the bound RSS must stay under"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Errors, lost requests, p50/p99 and worker RSS over a long run, then under attack."""
    from splitinfer.bench.soak import SoakSettings, run_soak

    if clients < 1 or seconds <= 0 or heavy < 0:
        raise UserError("--clients and --seconds must be positive, --heavy >= 0")
    result = run_soak(SoakSettings(model=model, clients=clients, seconds=seconds, attack=attack,
                                   heavy_requests=heavy, rss_cap_mb=rss_cap_mb))
    if json_out:
        emit_json(result)
        return
    load = result["load"]
    console.print(f"load: {load['answered']} answered, {load['errors']} errors, {load['lost']} lost, "
                  f"{load['wrong_answers']} wrong; p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms")
    console.print(f"RSS: baseline {result['baseline_rss_mb']} MB, peak {result['peak_rss_mb']} MB "
                  f"(cap {rss_cap_mb:g}: {'ok' if result['within_cap'] else 'EXCEEDED'}), after {result['after_rss_mb']} MB")
