"""A static file server for a built bundle: loopback by default, a token for anything else.

    server = BundleServer("view/", port=0).start()    # free port
    print(server.url)
    server.stop()

With a token, the first request must carry ``?token=T`` (the printed URL does); the server then
sets a cookie so the page's own script and image requests pass. Tokens are compared with
``hmac.compare_digest``.

``api`` maps paths to functions ``f(query) -> (status, JSON-able body)`` answered on POST, e.g.
``/api/replay`` (replay a failed level). Such a request must carry the header
``X-Loupe-Request: 1``: a page of another origin cannot send it without a CORS preflight, which
this server never grants. A LoupeError becomes status 400 with ``{"error": message}``.
"""

from __future__ import annotations

import errno
import functools
import hmac
import http.server
import ipaddress
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError

COOKIE = "loupe_token"
#: the header every api request carries
API_HEADER = "X-Loupe-Request"

log = logging.getLogger("loupe.explorer.server")
Api = dict[str, Callable[[dict[str, str]], tuple[int, Any]]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(http.server.SimpleHTTPRequestHandler):
    token: str | None = None
    api: Api = {}

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def _authorised(self) -> tuple[bool, bool]:
        """(allowed, set the cookie)."""
        if self.token is None:
            return True, False
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        given = (query.get("token") or [""])[0]
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            return True, True
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.token.encode()):
                return True, False
        return False, False

    def do_GET(self):
        allowed, set_cookie = self._authorised()
        if not allowed:
            body = b"loupe view: this server needs its token; open the URL it printed.\n"
            self.send_response(403)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if set_cookie:
            self._cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        super().do_GET()

    def send_response(self, code, message=None):
        super().send_response(code, message)
        cookie = getattr(self, "_cookie", None)
        if cookie:
            self.send_header("Set-Cookie", cookie)
            self._cookie = None

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        from loupe.errors import LoupeError

        allowed, _ = self._authorised()
        if not allowed:
            self._json(403, {"error": "this server needs its token; open the URL it printed"})
            return
        path = urllib.parse.urlsplit(self.path).path
        handler = self.api.get(path)
        if handler is None:
            self._json(404, {"error": f"no {path} here"})
            return
        if self.headers.get(API_HEADER) != "1":
            self._json(403, {"error": f"api requests carry the header {API_HEADER}: 1"})
            return
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        try:
            status, body = handler({k: v[0] for k, v in query.items()})
        except LoupeError as exc:
            status, body = 400, {"error": str(exc)}
        except Exception as exc:  # one request fails, the server stays up
            log.exception("api %s failed", path)
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        self._json(status, body)

    def do_HEAD(self):
        allowed, _ = self._authorised()
        if not allowed:
            self.send_error(403)
            return
        super().do_HEAD()


class BundleServer:
    """Serves ``directory`` on ``host:port`` from a background thread."""

    def __init__(self, directory, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 api: Api | None = None):  # fmt: skip
        if not is_loopback(host) and not token:
            raise LoupeError(
                f"--host {host} is reachable from other machines; give --token SECRET as well "
                "(or leave --host at 127.0.0.1)"
            )
        if not 0 <= port <= 65535:
            raise LoupeError(f"--port must be in 0..65535, got {port}")
        self.directory = Path(directory)
        self.host, self.token = host, token
        handler = type("Handler", (_Handler,), {"token": token, "api": dict(api or {})})
        try:
            self.httpd = http.server.ThreadingHTTPServer(
                (host, port), functools.partial(handler, directory=str(self.directory))
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LoupeError(
                    f"port {port} on {host} is in use; choose another --port or leave it out for a "
                    "free one"
                ) from None
            raise LoupeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"http://{host}:{self.port}/index.html"
        return f"{url}?token={urllib.parse.quote(self.token)}" if self.token else url

    def start(self) -> BundleServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)
