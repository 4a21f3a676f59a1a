"""Who may talk to the server: the Host and Origin rules that keep other web sites out.

Why: a server on 127.0.0.1 without --api-key is still reachable from every web page the user opens. A
page cannot read another origin's answers, but it can *send*: an HTML form POSTs multipart or text/plain
without a CORS preflight (so it could upload a LoRA, or run generations with JSON sent as text/plain), and
a DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) talks to the server as if same-origin. So:

* the ``Host`` header must name this server: ``127.0.0.1``, ``localhost``, ``[::1]``, the ``--host`` it
  binds (unless a wildcard) or a name given with ``--allowed-host`` (``*``: any); else 400 ``invalid_host``;
* a state-changing request (anything but GET/HEAD/OPTIONS) that carries an ``Origin`` must come from the
  server's own origin or one listed with ``--cors-origin``; else 403 ``cross_origin``. Clients that are not
  browsers send no ``Origin`` and are not affected;
* a WebSocket handshake (``/v1/realtime/video``) that carries an ``Origin`` must come from the same origins
  (cross-site WebSocket hijacking: a page can read a WebSocket's answers, so no method is "safe" there);
* JSON routes take ``Content-Type: application/json`` only (415 otherwise; see ``routes.read_body``).
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from .errors import APIError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _hostname(netloc: str) -> str:
    """``"[::1]:30010"`` -> ``"::1"``; ``"Example.COM:80"`` -> ``"example.com"``."""
    try:
        host = urlsplit(f"//{netloc}").hostname
    except ValueError:
        return netloc.lower()
    return (host or "").lower()


def allowed_hosts(settings) -> frozenset[str]:
    names = {*LOOPBACK, *(h.lower().strip("[]") for h in settings.allowed_hosts)}
    if settings.host not in WILDCARDS:
        names.add(settings.host.lower().strip("[]"))
    return frozenset(names)


def refuse(scope, settings, hosts: frozenset[str]) -> Optional[APIError]:
    """The Host / Origin refusal of one HTTP request or WebSocket handshake, or None."""
    headers = dict(scope["headers"])
    host = headers.get(b"host", b"").decode("latin-1")
    if host and "*" not in hosts and _hostname(host) not in hosts:
        return APIError(400, f"Host {host!r} is not a name of this server (it answers to {', '.join(sorted(hosts))}); "
                             "if clients reach it under that name, start it with --allowed-host "
                             f"{_hostname(host) or host}", code="invalid_host")
    origin = headers.get(b"origin")
    websocket = scope["type"] == "websocket"  # a page may read what a WebSocket answers: its Origin always counts
    what = "WebSocket connection" if websocket else scope["method"]
    if origin is None or (not websocket and scope["method"] in SAFE_METHODS):
        return None
    origin = origin.decode("latin-1")
    if origin in settings.cors_origins or "*" in settings.cors_origins:
        return None
    parts = urlsplit(origin) if origin != "null" else None
    if parts is not None and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower():
        return None  # the server's own pages (the playground)
    return APIError(403, f"cross-origin {what} from {origin!r} refused: only this server's own pages and "
                         "the origins given with --cors-origin may change state (generate, upload, delete) or "
                         "open a WebSocket",
                    code="cross_origin")
