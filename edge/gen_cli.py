"""`splitinfer generate`: stream a causal LM's tokens, on the edge alone or with a cloud worker.

A thin layer over :class:`splitinfer.edge.generate.Generator`. Tokens are written to the
terminal as they come (flushed each time); ``--json`` prints the per-generation record
instead. Bad input ends in one line (UserError); a cloud that cannot be reached is not an
error: the draft answers and a line on stderr says so.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Optional

import typer
from rich.console import Console

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

__all__ = ["generate_cmd", "run_generation"]

log = logging.getLogger(__name__)


async def run_generation(gen: Any, prompt: str, *, max_tokens: int, mode: str, temperature: float, seed: int,
                         stream: bool) -> dict[str, Any]:  # fmt: skip
    """One generation, tokens written to stdout as they come when ``stream``; its record."""
    try:
        async for tok in gen.generate(prompt, max_tokens=max_tokens, mode=mode, temperature=temperature, seed=seed):
            if stream and tok.text:
                sys.stdout.write(tok.text)
                sys.stdout.flush()
        return gen.last_record()
    finally:
        await gen.aclose()


def generate_cmd(
    model: str = typer.Option("bytelm", "--model", "-m", help="a causal LM of the zoo (splitinfer models)"),
    prompt: str = typer.Option(..., "--prompt", help="the text to continue"),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens (bytes) to generate"),
    mode: str = typer.Option("auto", "--mode", help="auto, edge, cloud, split, speculative or draft"),
    cloud: Optional[str] = typer.Option(None, "--cloud", help="a cloud worker's URL (modes cloud/split/speculative, auto)"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; > 0: sampled"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampling (temperature > 0)"),
    k: Optional[int] = typer.Option(None, "--draft-len", "-k", help="speculative: fixed draft length (default: adaptive)"),
    cut: Optional[int] = typer.Option(None, "--cut", help="split: blocks [0, CUT) run here (default: the policy's)"),
    hidden_dtype: str = typer.Option("float32", "--hidden-dtype", help="split: the hidden state on the wire, float32 or float16"),
    timeout_s: float = typer.Option(10.0, "--timeout", help="seconds one cloud step may take before the draft takes over"),
    token: Optional[str] = typer.Option(None, "--token", envvar="SPLITINFER_TOKEN", help="bearer token of the worker"),
    tls_ca: Optional[str] = typer.Option(None, "--tls-ca", help="PEM CA that signs trusted workers (https)"),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM client certificate (mutual TLS)"),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    tls_pin: Optional[list[str]] = typer.Option(None, "--tls-pin", help="SHA-256 of the worker's certificate"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads here (default: torch's)"),
    json_out: bool = typer.Option(False, "--json", help="print the generation's JSON record instead of the text"),
) -> None:
    """Generate text with a causal LM: here, on a cloud worker, split, or speculatively."""
    from splitinfer.edge.generate import GEN_MODES, Generator
    from splitinfer.edge.tls import ClientTLS
    from splitinfer.models.lmzoo import is_lm, lm_names

    if not is_lm(model):
        raise UserError(f"unknown LM {model!r}; known: {', '.join(lm_names())}")
    if mode not in GEN_MODES:
        raise UserError(f"--mode must be one of {', '.join(GEN_MODES)}, got {mode!r}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not prompt:
        raise UserError("--prompt is empty")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if mode in ("cloud", "split", "speculative") and not cloud:
        raise UserError(f"--mode {mode} needs --cloud URL")
    tls = ClientTLS(ca=tls_ca, cert=tls_cert, key=tls_key, pins=tuple(tls_pin or ()))
    gen = Generator(model, cloud=cloud, token=token, tls=tls, threads=threads, timeout_s=timeout_s, k=k, cut=cut,
                    hidden_dtype=hidden_dtype)  # fmt: skip
    record = asyncio.run(run_generation(gen, prompt, max_tokens=max_tokens, mode=mode, temperature=temperature,
                                        seed=seed, stream=not json_out))  # fmt: skip
    if json_out:
        emit_json(record)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    err = Console(stderr=True)
    for fb in record.get("fallbacks", []):
        err.print(f"[yellow]note:[/] the cloud did not answer at token {fb['at_token']} ({fb['reason']}): "
                  f"the {fb['to']} model generated instead", highlight=False, soft_wrap=True)  # fmt: skip
    tpot = record["tpot_ms"]
    extra = f", draft length {record['draft_len']}, acceptance {record['acceptance']}" if record.get("draft_len") else ""
    err.print(f"{record['tokens']} tokens, mode {record['mode']}: first after {record['ttft_ms']} ms, "
              f"then {tpot['p50']} ms/token (p50), {record['tokens_per_s']} tokens/s, "
              f"{record['round_trips']} round trips{extra}", highlight=False, soft_wrap=True)  # fmt: skip
