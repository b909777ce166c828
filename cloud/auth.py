"""Who may call the worker: bearer tokens of named clients, each with scopes.

Scopes: ``infer`` (``/v1/infer``, ``/v1/stream``, ``/v1/probe``, ``/v1/models``) and
``admin`` (``/v1/profile``, ``/metrics``). ``--token T`` is one client, ``token``, with
both; ``--token-file F`` names several (JSON, or TOML when F ends in ``.toml``)::

    {"clients": {"camera-1": {"token": "...", "scopes": ["infer"]},
                 "ops": {"token_sha256": "<hex of sha256(token)>", "scopes": ["admin"]}}}

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
client without stopping early, so neither the time nor the length of a guess tells
anything. The middleware answers 401/403 from the headers alone: a refused request's
body is never read (the connection is closed after the answer). ``/healthz`` stays open
but says only ``{"status": "ok"}`` to a caller without a valid token.

The client's name goes on the request as ``request[CLIENT]`` (a ``web.RequestKey`` named "client"): the
token's client, else the common name of a mutual-TLS certificate as ``cert:<CN>``, else
"" (anonymous). Whatever is keyed by caller (de-duplication) uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from splitinfer.cloud.tls import peer_cert_name
from splitinfer.errors import UserError
from splitinfer.wire.protocol import ErrorCode, ErrorMessage, encode_message

__all__ = ["CLIENT", "SCOPES", "TokenClient", "Tokens", "auth_middleware", "required_scope"]

CLIENT = web.RequestKey("client", str)  # request[CLIENT]: the authenticated client's name
SCOPES = frozenset({"infer", "admin"})
ADMIN_PATHS = frozenset({"/v1/profile", "/metrics"})
OPEN_PATHS = frozenset({"/healthz"})
MSGPACK = "application/msgpack"
_HEX64 = re.compile(r"[0-9a-f]{64}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenClient:
    name: str
    digest: bytes  # sha256 of the token: the secret itself is not kept
    scopes: frozenset[str]


class Tokens:
    """The clients a worker accepts; empty means the worker is open (no tokens)."""

    def __init__(self, clients: tuple[TokenClient, ...] = ()) -> None:
        digests = [c.digest for c in clients]
        if len(set(digests)) != len(digests):
            raise UserError("two clients share a token: each client needs its own")
        self.clients = clients

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    @classmethod
    def from_config(cls, token: str | None, token_file: str | None) -> "Tokens":
        """--token (client "token", both scopes) plus the clients of --token-file."""
        clients: list[TokenClient] = []
        if token:
            clients.append(TokenClient("token", _digest(token), SCOPES))
        if token_file:
            clients.extend(load_token_file(token_file))
        return cls(tuple(clients))

    def identify(self, authorization: str | None) -> TokenClient | None:
        """The client whose token is in an ``Authorization: Bearer`` header, or None."""
        if not authorization or not self.clients:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        got = _digest(presented.strip())
        found: TokenClient | None = None
        for client in self.clients:  # every one, no early exit: time does not depend on which
            if hmac.compare_digest(got, client.digest):
                found = client
        return found


def load_token_file(path: str) -> list[TokenClient]:
    """Clients from a JSON or TOML token file; any mistake is one UserError line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    try:
        data: Any = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"the token file {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {exc}") from None
    clients = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(clients, dict) or not clients:
        raise UserError(f'the token file {path} needs {{"clients": {{"name": {{"token": "...", "scopes": ["infer"]}}}}}}')
    out = []
    for name, entry in clients.items():
        where = f"{path}: client {name!r}"
        if not isinstance(entry, dict) or not str(name).strip():
            raise UserError(f"{where}: expected a table with token and scopes")
        scopes = entry.get("scopes", ["infer"])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            raise UserError(f"{where}: scopes must be a non-empty list of {sorted(SCOPES)}")
        token, hashed = entry.get("token"), entry.get("token_sha256")
        if isinstance(token, str) and token.strip() and hashed is None:
            digest = _digest(token.strip())
        elif token is None and isinstance(hashed, str) and _HEX64.fullmatch(hashed.lower()):
            digest = bytes.fromhex(hashed.lower())
        else:
            raise UserError(f"{where}: give exactly one of token (non-empty) or token_sha256 (64 hex digits)")
        out.append(TokenClient(str(name), digest, frozenset(scopes)))
    return out


def required_scope(path: str) -> str | None:
    """The scope a path needs when tokens are on (None: open)."""
    if path in OPEN_PATHS:
        return None
    return "admin" if path in ADMIN_PATHS else "infer"


async def _refuse(request: web.Request, status: int, message: str) -> web.StreamResponse:
    """Answer from the headers and close: a body that is on its way is never read."""
    err = ErrorMessage(None, ErrorCode.UNAUTHORIZED, message)
    resp = web.Response(body=encode_message(err), status=status, content_type=MSGPACK)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="splitinfer"'
    if request.body_exists and not request.content.is_eof():
        # aiohttp would otherwise read and discard the rest of the body ("lingering") to
        # keep the connection: for a 1 GiB upload that is the very work to refuse.
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()
    return resp


def auth_middleware(tokens: Tokens) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware enforcing `tokens` (and naming the client on every request)."""

    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = tokens.identify(request.headers.get("Authorization"))
        if client is not None:
            request[CLIENT] = client.name
        else:
            cn = peer_cert_name(request)
            request[CLIENT] = f"cert:{cn}" if cn else ""
        if not tokens.enabled:
            return await handler(request)
        need = required_scope(request.path)
        if need is None:
            if client is None and request.path == "/healthz":
                return web.json_response({"status": "ok"})  # alive, and nothing more
            return await handler(request)
        if client is None:
            return await _refuse(request, 401, "missing or wrong bearer token")
        if need not in client.scopes and not (request.path == "/v1/models" and client.scopes):
            return await _refuse(request, 403, f"client {client.name!r} lacks the {need!r} scope for {request.path}")
        return await handler(request)

    return _auth
