"""The read-only status page over HTTP: GET / (the page), its assets, and GET /api/status (the snapshot).

Standard library only (http.server in a daemon thread), and the page's HTML, JS and CSS ship in the package
(`coordinator/static/`), so nothing is fetched from the internet and nothing is built on the user's machine.
It binds 127.0.0.1 unless the user names another interface; bound to loopback it also refuses requests whose
Host header is not a loopback name, so a web page in the user's browser cannot read it by DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from collections.abc import Callable

from coordinator.status import to_json

logger = logging.getLogger("swarm.coordinator")

ASSETS = {"/status.js": "application/javascript", "/status.css": "text/css"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser holding a connection open must not keep the process alive


class _Server6(_Server):
    address_family = socket.AF_INET6


def asset(name: str) -> str:
    return resources.files("coordinator").joinpath("static", name).read_text(encoding="utf-8")


def standalone_page(snapshot: dict) -> str:
    """One self-contained HTML file showing `snapshot` (no server needed: open it from disk)."""
    embedded = to_json(snapshot).replace("</", "<\\/")  # a string in the data cannot close the script
    page = asset("status.html")
    page = page.replace('<link rel="stylesheet" href="status.css">', f"<style>\n{asset('status.css')}</style>")
    return page.replace(
        '<script src="status.js"></script>',
        f'<script id="snapshot" type="application/json">{embedded}</script>\n<script>\n{asset("status.js")}</script>',
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class StatusServer:
    """Serves `snapshot()` as JSON and the page; `start()` returns self, `stop()` closes the socket."""

    def __init__(self, snapshot: Callable[[], dict], host: str = "127.0.0.1", port: int = 0):
        self.snapshot = snapshot
        self._httpd = (_Server6 if ":" in host else _Server)((host, port), self._handler_class())
        self.host, self.port = host, self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-page", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                if _is_loopback(server.host) and not self._host_is_loopback():
                    self._send(HTTPStatus.FORBIDDEN, "text/plain", b"status page: loopback names only\n")
                    return
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", asset("status.html").encode())
                elif path in ASSETS:
                    self._send(HTTPStatus.OK, f"{ASSETS[path]}; charset=utf-8", asset(path[1:]).encode())
                elif path == "/api/status":
                    self._send(HTTPStatus.OK, "application/json", to_json(server.snapshot()).encode())
                else:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

            def _host_is_loopback(self) -> bool:
                host = (self.headers.get("Host") or "").strip()
                if host.startswith("["):
                    host = host[1:host.find("]")] if "]" in host else host
                else:
                    host = host.rsplit(":", 1)[0]
                return _is_loopback(host)

            def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 -- http.server's signature
                logger.debug("status page: " + format, *args)

        return Handler
