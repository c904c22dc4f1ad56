"""The HTTP side of `femtogpt serve`, below its routes: strict request framing,
the errors a request can be refused with, a handler base that answers JSON,
error answers and event streams, and a server with a bounded number of
handler threads. Nothing here knows about runs or models.

What a client that misbehaves gets:
- It goes away at any point (while sending its request or body, or while it
  is answered): its handler ends quietly, with one line under --verbose.
- A Content-Length that is not a plain number of bytes, more than one of
  them, or a Transfer-Encoding: a 400. (A body is read by its Content-Length
  alone, and the connection always closes after one answer, so nothing a
  client sends can be read as a second request.)
- A body over MAX_BODY_BYTES: a 413 naming the limit, then the connection
  closes. The answer goes first and what the client still sends is read and
  thrown away for at most LINGER_S, so that a client that sends its whole
  body before reading (most do) reads the 413 instead of a reset. Reading
  the whole body first instead would let a claim of 10 GB hold a thread.
- A request not whole within REQUEST_TIMEOUT_S of connecting: a 408 (or,
  when it sent nothing, just the close). The deadline is for the whole
  request, not for each read, so dribbling a byte at a time does not help.
- More connections than MAX_HANDLERS: a 503 at once, from the accepting thread.
"""
from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import time
import traceback

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
MAX_BODY_BYTES = 1 << 20            # the page's largest request (20,000 characters) is < 100 kB
# Handler threads: one per open connection, at most this many. A tab of the
# page holds one for its live stream and one while a sample streams, and a
# browser opens up to 6 connections to a server while loading it; 16 lets
# two or three tabs work at once. More would not run faster (the models are
# the cost, and each run lends at most MODELS_PER_RUN of them); a thread is
# a cheap 8 MB of address space, but an unbounded number of them is not.
MAX_HANDLERS = 16
REQUEST_TIMEOUT_S = 10.0            # from connecting to the request read whole
SOCKET_TIMEOUT_S = 30               # any one write after that (a reader that stalled)
LINGER_S = 2.0                      # reading what a refused client still sends
LINGER_BYTES = 64 << 20


class Refused(Exception):
    """A request answered with its status and this message."""
    status = 400


class BadRequest(Refused):
    """Input the page should not have sent: its message goes back as a 400."""


class Forbidden(Refused):
    """A request from somewhere this server does not serve: a 403."""
    status = 403


class TooLarge(Refused):
    status = 413


class _ClientGone(Exception):
    """The client closed its end (or stalled past the timeout) mid-request."""


class JSONHandler(BaseHTTPRequestHandler):
    """One request per connection, and the answers every route shares.

    Every answer says Connection: close: a kept-alive connection would hold
    one of the MAX_HANDLERS threads while it waits for a next request that
    may never come (a browser keeps idle ones open), and on loopback a new
    connection costs next to nothing."""
    server_version = "femtogpt"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):      # quiet: the terminal is the user's
        if self.server.verbose:
            super().log_message(fmt, *args)

    def setup(self):
        super().setup()
        self.connection.settimeout(SOCKET_TIMEOUT_S)
        self.phase, self.requestline, self.events_started = "reading the request", "", False
        self.timed_out, self.unread = False, False
        self.server.watch(self)

    def handle(self):
        try:
            self.handle_one_request()
        except (_ClientGone, OSError) as err:
            if self.timed_out and self.phase.startswith("reading"):
                return self._answer_timeout()
            self._went_away(err)

    def handle_one_request(self):
        # As BaseHTTPRequestHandler's, less what one request per connection
        # does not need, and telling a client that left from a timeout.
        self.close_connection = True
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            return                  # connected and left (or timed out) without a word
        if self.timed_out:
            return self._answer_timeout()
        if len(self.raw_requestline) > 65536:
            return self.send_error_json(414, "the request line is longer than 65,536 bytes")
        if not self.raw_requestline.endswith(b"\n"):
            raise _ClientGone("its request line was cut short")
        if not self.parse_request():    # (it has answered)
            return
        if self.timed_out:
            return self._answer_timeout()
        self.unread = bool(self.headers.get("Content-Length", "").strip("0 \t")
                           or "Transfer-Encoding" in self.headers)
        if not self.unread:
            self.server.unwatch(self)       # the request is whole
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            return self.send_error_json(501, f"{self.command[:20]!r} is not served here")
        method()

    def finish(self):
        self.server.unwatch(self)
        super().finish()
        if self.unread:
            self._linger()

    def _linger(self):
        """Reads and drops what the client still sends after its answer (a
        refused body), so that closing does not reset the connection before
        the client has read the answer; bounded by LINGER_S and LINGER_BYTES."""
        sock, left = self.connection, LINGER_BYTES
        deadline = time.monotonic() + LINGER_S
        try:
            sock.shutdown(socket.SHUT_WR)   # the answer is whole: the client may stop
            while left > 0 and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def _answer_timeout(self):
        self.unread = False                 # the server has shut its reading side
        try:
            self.send_error_json(408, f"the request was not whole within "
                                      f"{self.server.request_timeout:g} s")
        except _ClientGone:
            pass

    def _went_away(self, err):
        # (a connection that never sent a byte is not a request: browsers open
        # spare ones and close them unused)
        if self.server.verbose and getattr(self, "raw_requestline", b""):
            what = f" ({self.requestline[:80]})" if self.requestline else ""
            why = str(err) if isinstance(err, _ClientGone) else type(err).__name__
            sys.stderr.write(f"femtogpt serve: {self.address_string()}:{self.client_address[1]}"
                             f" went away while {self.phase}{what}: {why}\n")

    # -- responses: every write that fails is the client gone

    def _write(self, data):
        try:
            self.wfile.write(data)
        except (OSError, ValueError) as err:
            raise _ClientGone(type(err).__name__) from None

    def flush_headers(self):
        if hasattr(self, "_headers_buffer"):
            data, self._headers_buffer = b"".join(self._headers_buffer), []
            self._write(data)

    def handle_expect_100(self):
        # A client that asks before sending its body (curl does, for large
        # ones) learns that it is refused before it sends a byte of it.
        try:
            self.body_length()
        except Refused as err:
            self.unread = True              # if it sends the body all the same
            self.send_error_json(err.status, str(err))
            return False
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        # (parse_request's refusals: a bad request line, too many headers...)
        self.send_error_json(int(code), message or HTTPStatus(code).phrase)

    def send_json(self, value, status=200):
        self.send_bytes(json.dumps(value).encode("utf-8"), "application/json; charset=utf-8",
                        status)

    def send_bytes(self, body, content_type, status=200):
        self.phase = "sending the answer"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self._write(body)

    def send_error_json(self, status, message):
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
        self.phase = "streaming events"

    def send_event(self, event, data):
        self._write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode("utf-8"))

    def wait_unless_gone(self, seconds):
        """Waits between the events of a long stream, and ends it as soon as
        the client closes: after its request a client sends nothing more, so
        a readable socket is a closed (or reset) one. Without this a closed
        tab would hold its thread until the next write failed."""
        try:
            readable, _, _ = select.select([self.connection], [], [], seconds)
        except (OSError, ValueError) as err:
            raise _ClientGone(type(err).__name__) from None
        if readable:
            raise _ClientGone("it closed the stream")

    # -- requests

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

    def body_length(self):
        """The body's length from a strict reading of the headers (a body
        framed two ways could be read one way here and another by a proxy)."""
        if "Transfer-Encoding" in self.headers:
            raise BadRequest("Transfer-Encoding is not accepted: send the body with a "
                             "Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if len(values) > 1:
            raise BadRequest("more than one Content-Length header")
        text = values[0].strip(" \t") if values else "0"
        if not (text.isascii() and text.isdigit()):
            raise BadRequest(f"Content-Length must be a number of bytes, got {text[:40]!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise TooLarge(f"the request body is {length:,} bytes; the limit is "
                           f"{MAX_BODY_BYTES:,} bytes")
        return length

    def _body(self):
        length = self.body_length()
        self.phase = "reading the body"
        try:
            raw = self.rfile.read(length) if length else b""
        except OSError as err:
            raise _ClientGone(type(err).__name__) from None
        if len(raw) < length:
            if self.timed_out:
                raise _ClientGone("timed out")
            raise _ClientGone(f"its body was cut short at {len(raw):,} of {length:,} bytes")
        self.unread = False
        self.server.unwatch(self)
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
        self.send_bytes(body, content_type)


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with at most MAX_HANDLERS handler threads, one per
    connection while it is served; a connection beyond them gets a 503 at
    once. Requests not read whole within request_timeout are cut off: each
    pass of serve_forever's loop (every 0.5 s) shuts the reading side of the
    late ones, which wakes their handler."""
    allow_reuse_address = True
    request_queue_size = 128            # a burst of connections waits in the kernel

    def __init__(self, address, handler, verbose=False):
        super().__init__(address, handler)
        self.verbose = verbose
        self.loopback = address[0] in ("127.0.0.1", "localhost", "::1")
        self.max_handlers = MAX_HANDLERS
        self.request_timeout = REQUEST_TIMEOUT_S
        self._slots = threading.BoundedSemaphore(self.max_handlers)
        self._deadlines = {}                # handler -> when its request must be read
        self._lock = threading.Lock()
        self._count = 0

    # -- threads

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            return self._refuse(request)
        self._count += 1
        threading.Thread(target=self._serve, args=(request, client_address), daemon=True,
                         name=f"femtogpt serve handler {self._count}").start()

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def _refuse(self, sock):
        """A 503 from the accepting thread, which must not wait on the client:
        the answer fits an empty send buffer, and what the client has sent so
        far is read (without waiting) so that closing sends no reset."""
        body = json.dumps({"error": f"the server is busy: it serves {self.max_handlers} "
                                    f"connections at once, its limit; try again in a "
                                    f"moment"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; "
                f"charset=utf-8\r\nContent-Length: {len(body)}\r\nRetry-After: 2\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)
            sock.send(head + body)
            sock.shutdown(socket.SHUT_WR)
            for _ in range(64):
                if not sock.recv(1 << 16):
                    break
        except OSError:
            pass
        sock.close()

    def handle_error(self, request, client_address):
        # A bug outside the routes (which answer their own with a 500): one
        # line, and the traceback only under --verbose.
        kind, err, _ = sys.exc_info()
        print(f"femtogpt serve: {kind.__name__}: {err}", file=sys.stderr)
        if self.verbose:
            traceback.print_exc()

    # -- the request deadline

    def watch(self, handler):
        with self._lock:
            self._deadlines[handler] = time.monotonic() + self.request_timeout

    def unwatch(self, handler):
        with self._lock:
            self._deadlines.pop(handler, None)

    def service_actions(self):
        now = time.monotonic()
        with self._lock:
            late = [h for h, deadline in self._deadlines.items() if deadline < now]
            for handler in late:
                del self._deadlines[handler]
        for handler in late:
            handler.timed_out = True
            try:
                handler.connection.shutdown(socket.SHUT_RD)     # its read returns now
            except OSError:
                pass
