"""`splitinfer federate serve`: a Flower SuperLink plus one run of federated distillation.

    splitinfer federate serve -m student:tinycnn-digits --rounds 5 --min-clients 4 \\
        [--strategy fedavg|fedprox] [--store DIR --key KEY [--trust KEY.pub]] [--port P] [--json]
        [--interface ADDR] [--no-advertise]

Edges join with ``splitinfer edge ... --learn --federate 127.0.0.1:P``, or ``--federate mdns``:
while it runs the SuperLink's Fleet API is announced over mDNS (``_splitinfer-fl._tcp``, TXT
``model``, ``rounds``, ``strategy``) and withdrawn on exit. The command waits
for ``--min-clients`` SuperNodes, runs the rounds, publishes each improving round's student
into ``--store`` (signed with ``--key``), prints the per-round summary and stops the SuperLink.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional

import typer

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

log = logging.getLogger(__name__)

federate_app = typer.Typer(help="federated distillation of the fallback student (Flower)", no_args_is_help=True)


@federate_app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", "-m", help="the fallback student's spec, e.g. student:tinycnn-digits"),
    rounds: int = typer.Option(3, "--rounds", help="federated rounds"),
    min_clients: int = typer.Option(2, "--min-clients", help="SuperNodes each round waits for"),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg or fedprox"),
    mu: float = typer.Option(0.01, "--mu", help="fedprox: proximal term weight"),
    port: int = typer.Option(9092, "--port", help="SuperLink port on --host (Fleet and Control APIs)"),
    host: Optional[str] = typer.Option(None, "--host", help="address the SuperLink listens on (default 127.0.0.1, or the --interface address; insecure: keep it local)"),
    advertise: bool = typer.Option(True, "--advertise/--no-advertise", help="announce the Fleet API over mDNS (for edges' --federate mdns)"),
    interface: Optional[str] = typer.Option(None, "--interface", help="address to announce on (and listen on, without --host)"),
    round_timeout: float = typer.Option(120.0, "--round-timeout", help="seconds a round waits for replies"),
    local_epochs: int = typer.Option(2, "--local-epochs", help="client epochs over its buffer per round"),
    dp_clip: float = typer.Option(0.0, "--dp-clip", help="clients clip their update to this L2 norm (0: no DP)"),
    dp_noise: float = typer.Option(0.0, "--dp-noise", help="clients add Gaussian noise of std NOISE x CLIP"),
    store: Optional[str] = typer.Option(None, "--store", help="model store to publish improved students into"),
    key: Optional[str] = typer.Option(None, "--key", help="Ed25519 private key to sign published versions"),
    trust: Optional[list[str]] = typer.Option(None, "--trust", help="refuse to publish unless --key matches one of these"),
    work: Optional[Path] = typer.Option(None, "--work", help="folder for logs and per-round weights (default: a temp folder)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run a Flower SuperLink and R rounds of federated distillation of the fallback."""
    from splitinfer.cloud.federate_run import SuperLinkProcess, announce_host

    if strategy not in ("fedavg", "fedprox"):
        raise UserError(f"--strategy must be fedavg or fedprox, got {strategy!r}")
    if rounds < 1 or min_clients < 1 or local_epochs < 1 or not round_timeout > 0:
        raise UserError("--rounds, --min-clients, --local-epochs and --round-timeout must be positive")
    if (store is None) != (key is None):
        raise UserError("publishing needs both --store and --key")
    if dp_noise < 0 or dp_clip < 0 or (dp_noise > 0 and dp_clip == 0):
        raise UserError("--dp-noise needs a positive --dp-clip")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535 (0: any free port), got {port}")
    host = host or interface or "127.0.0.1"  # never announce an address the SuperLink does not listen on
    if advertise:
        announce_host(host, interface)  # a mismatch fails here, before the SuperLink starts
    folder = work or Path(tempfile.mkdtemp(prefix="splitinfer-federate-"))
    config = {"model": model, "rounds": rounds, "min-clients": min_clients, "strategy": strategy, "proximal-mu": mu,
              "round-timeout": round_timeout, "local-epochs": local_epochs, "dp-clip": dp_clip, "dp-noise": dp_noise,
              "store": str(Path(store).resolve()) if store else "", "key": str(Path(key).resolve()) if key else "",
              "trust": ",".join(str(Path(t).resolve()) for t in trust or ()), "out-dir": str(folder / "run")}  # fmt: skip
    with _sigterm_interrupts(), SuperLinkProcess(folder, port=port, host=host) as link:
        announced = link.advertise(model, rounds, strategy, interface) if advertise else None
        log.warning("SuperLink on %s%s: waiting for %d SuperNode(s)", link.address,
                    f" (announced over mDNS as {announced})" if announced else "", min_clients)  # fmt: skip
        result = link.run(config)
    result["work"] = str(folder)
    if json_out:
        emit_json(result)
        return
    for r in result["rounds"]:
        typer.echo(f"round {r['round']}: check {100 * r['check_accuracy']:.1f} %, aggregated {r.get('aggregated', '-')}, "
                   f"refused {len(r.get('refused', []))}, published {r.get('published_version') or '-'}")  # fmt: skip


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C does: the mDNS record is withdrawn and the
    SuperLink stopped on the way out (as the cloud worker drains on SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(app: typer.Typer) -> None:
    app.add_typer(federate_app, name="federate")
