"""The HTTP side of `femtogpt serve`, below its routes: the errors a request
can be refused with, and a handler base that answers JSON, error answers and
event streams, reads a request's JSON body, and refuses requests from other
origins. Nothing here knows about runs or models.
"""
from __future__ import annotations

import json
import os

from http.server import BaseHTTPRequestHandler

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_S = 30


class BadRequest(Exception):
    """Input the page should not have sent: its message goes back as a 400."""


class _ClientGone(Exception):
    pass


class Forbidden(Exception):
    """A request from somewhere this server does not serve: a 403."""


class JSONHandler(BaseHTTPRequestHandler):
    """Responses and request checks shared by every route."""
    server_version = "femtogpt"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):      # quiet: the terminal is the user's
        if self.server.verbose:
            super().log_message(fmt, *args)

    def setup(self):
        super().setup()
        self.connection.settimeout(SOCKET_TIMEOUT_S)

    # -- responses

    def send_json(self, value, status=200):
        body = json.dumps(value).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status, message):
        # (closing: a request refused early may leave its body unread, which
        # must not be taken for the next request)
        self.close_connection = True
        if self.events_started:
            self.send_event("error", {"error": message})
            return
        self.send_json({"error": message}, status)

    def start_events(self):
        self.events_started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, event, data):
        message = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode("utf-8")
        try:
            self.wfile.write(message)
            self.wfile.flush()
        except (OSError, ValueError):
            raise _ClientGone() from None

    def _check_origin(self, method):
        """Only pages of this server may use it: a Host that is not the address
        it serves (DNS rebinding) and a POST that is not JSON (a plain form or
        text/plain request from another site, which needs no CORS preflight)
        are refused."""
        host = (self.headers.get("Host") or "").lower()
        if self.server.loopback and host.rsplit(":", 1)[0] not in (
                "127.0.0.1", "localhost", "[::1]"):
            raise Forbidden(f"this server answers to 127.0.0.1 and localhost only, not "
                            f"{host[:80]!r}")
        if method == "POST" and not (self.headers.get("Content-Type") or "").startswith(
                "application/json"):
            raise BadRequest("requests must be sent as application/json")

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"request of {length:,} bytes is larger than the "
                             f"{MAX_BODY_BYTES:,} allowed")
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("the request is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request must be a JSON object")
        return body

    def _static(self, name, content_type):
        with open(os.path.join(WEB, name), "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
