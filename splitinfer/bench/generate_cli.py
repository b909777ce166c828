"""`splitinfer bench generate`: options, the table, the JSON (the measuring is in generate.py)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

__all__ = ["generate_cmd"]

log = logging.getLogger(__name__)


def generate_cmd(
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    quick: bool = typer.Option(False, "--quick", help="one cell (RTT 20 ms, 5.85 Mbit/s), 16 tokens, no calibration: a test run"),
    cells: Optional[str] = typer.Option(None, "--cells", help="full (3x3), diagonal, or RTTxMBIT,... e.g. 20x5.85,80x1.1 (default: full; --quick: 20x5.85)"),
    modes: Optional[str] = typer.Option(None, "--modes", help="comma-separated: edge,cloud,split,speculative,draft,auto (default: all)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the JSON to this file"),
    model: str = typer.Option("bytelm", "--model", "-m", help="the LM (its draft from the zoo)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="new tokens per generation (default 128; --quick 16)"),
    edge_slowdown: float = typer.Option(10.0, "--edge-slowdown", help="how many times slower the edge's CPU is"),
    no_kill: bool = typer.Option(False, "--no-kill", help="skip the SIGKILL scenario"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="also write the results table and targets as Markdown"),
) -> None:
    """Every generation mode on emulated links (netns + tbf + delay line, slow edge), cloud
    tokens/s with concurrent sessions, a generation through a cloud SIGKILL, the targets."""
    from splitinfer.bench.generate import GenBenchSettings, parse_cells, parse_modes, run_generate_bench

    over: dict = {"model": model, "edge_slowdown": edge_slowdown, "kill": not no_kill}
    if cells is not None:
        over["cells"] = parse_cells(cells)
    if modes is not None:
        over["modes"] = parse_modes(modes)
    if max_tokens is not None:
        if max_tokens < 2:
            raise UserError("--max-tokens must be at least 2")
        over["max_tokens"] = max_tokens
    settings = GenBenchSettings.quick_settings(**over) if quick else GenBenchSettings(**over)

    def progress(msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    result = run_generate_bench(settings, progress=progress)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        from splitinfer.bench.generate_report import markdown_report

        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(markdown_report(result, "splitinfer bench generate " + " ".join(sys.argv[3:])))
    if json_out:
        emit_json(result)
        return
    _print_tables(result)


def _print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result['model']} (draft {result['draft']}): {result['grid']}, {result['max_tokens']} tokens")
    for col in ("RTT ms", "Mbit/s", "mode", "ms/token", "TTFT ms", "accept", "B/tok up", "B/tok down", "= ref"):
        table.add_column(col, justify="right")
    fmt = (lambda v, spec=".1f": "-" if v is None else format(v, spec))  # noqa: E731
    for cell in result["results"]:
        for mode, m in cell["modes"].items():
            name = mode if mode != "auto" or not m.get("chosen") else f"auto->{m['chosen']}"
            table.add_row(f"{cell['rtt_ms']:g}", f"{cell['mbit']:g}", name, fmt(m.get("ms_per_token")),
                          fmt(m.get("ttft_ms")), fmt(m.get("acceptance"), ".2f"), fmt(m.get("bytes_up_per_token"), ".0f"),
                          fmt(m.get("bytes_down_per_token"), ".0f"), "yes" if m.get("equal_reference") else "NO")  # fmt: skip
    console.print(table)
    for name, t in result["targets"].items():
        if name != "summary":
            console.print(f"{name}: {t['status']}")
