"""`femtogpt serve` against clients that misbehave (issue #25): clients that
vanish at every stage, bad framing, oversized bodies, idle connections.

Each test runs the real command (`python -m femtogpt.app.cli serve`) as a
subprocess with its stderr in a file, so it can assert both what the client
received and that the server's terminal shows no traceback. Before reading
stderr, a test waits until the server's thread count is back to what it was
at rest (its handlers have ended, so whatever they would print is printed).
Loopback only; every loop is bounded in count and time."""
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from test_serve import PACKAGE_PARENT, run_dir  # noqa: F401 (fixture)

MIB = 1 << 20


class ServerProcess:
    """`femtogpt serve` in a subprocess on a free port; `prelude` is Python run
    first in that process (to shorten a timeout for a test)."""

    def __init__(self, folder, log, *flags, prelude=""):
        self.log_path = str(log)
        self.log = open(self.log_path, "w")
        code = (prelude + "import sys\nfrom femtogpt.app.cli import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
        argv = ["-m", "femtogpt.app.cli"] if not prelude else ["-c", code]
        self.proc = subprocess.Popen(
            [sys.executable, *argv, "serve", "--out", folder, "--port", "0", "--threads", "1",
             *flags], stdout=subprocess.DEVNULL, stderr=self.log, cwd=PACKAGE_PARENT)
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None and time.monotonic() < deadline:
            for line in self.stderr().splitlines():
                if "serving" in line and "http://" in line:
                    self.port = int(line.split("http://", 1)[1].split()[0].rsplit(":", 1)[1])
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.05)
        assert self.port, self.stderr()
        assert get(self, "/api/runs")[0] == 200     # warmed up: the model is loaded
        self.settle()
        self.rest = self.threads()

    def stderr(self, start=0):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[start:]

    def mark(self):
        return len(self.stderr())

    def threads(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])

    def settle(self, timeout=15):
        """Waits (bounded) until the server's handlers have all ended."""
        deadline = time.monotonic() + timeout
        rest = getattr(self, "rest", None)
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = self.threads()
            if rest is not None and now <= rest:
                return
            if rest is None:                        # at start: until it stops changing
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > 0.5:
                    return
            time.sleep(0.05)

    def assert_quiet(self, mark):
        self.settle()
        text = self.stderr(mark)
        assert "Traceback" not in text and "Error" not in text, text[:3000]
        assert self.proc.poll() is None, text[:3000]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def big_run(run_dir, tmp_path_factory):  # noqa: F811
    """The test run with 20,000 extra metrics rows, so that its metrics are a
    JSON answer of some megabytes: one a client can leave in the middle of."""
    copy = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(run_dir, copy)
    row = {"iter": 20, "train_loss": 2.0, "val_loss": 2.1, "val_bpc": 3.0, "lr": 1e-3,
           "tokens_per_s": 900.0, "elapsed_s": 4.0}
    with open(copy / "metrics.jsonl", "a") as f:
        f.write((json.dumps(row) + "\n") * 20000)
    return str(copy)


@pytest.fixture(scope="module")
def srv(big_run, tmp_path_factory):
    server = ServerProcess(big_run, tmp_path_factory.mktemp("log") / "stderr.txt")
    yield server
    server.close()


def connect(server, timeout=10, receive_buffer=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:              # a small window: the server cannot send far ahead
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", server.port))
    return sock


def reset(sock):
    """Closes with a TCP reset (SO_LINGER 0), as a client that crashed does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_all(sock, timeout=10):
    reply, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return reply
        reply += chunk
    raise AssertionError(f"the server did not close within {timeout} s: {reply[:200]!r}")


def status_and_error(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"] if body.startswith(b"{") else body


def get(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def post_raw(headers, body=b""):
    return (b"POST /api/runs/0/sample HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers
            + b"\r\n" + body)


def test_fifty_clients_that_send_half_a_request_line_and_leave(srv):
    mark = srv.mark()
    for i in range(50):
        sock = connect(srv)
        sock.sendall(b"GET /api/ru")
        if i % 2:
            reset(sock)
        else:
            sock.close()
    assert get(srv, "/api/runs")[0] == 200
    srv.assert_quiet(mark)


@pytest.mark.parametrize("headers, message", [
    (b"Content-Length: -5\r\n", "Content-Length"),
    (b"Content-Length: abc\r\n", "Content-Length"),
    (b"Content-Length: +2\r\n", "Content-Length"),
    (b"Content-Length: 2\r\nContent-Length: 2\r\n", "more than one Content-Length"),
    (b"Transfer-Encoding: chunked\r\n", "Transfer-Encoding"),
])
def test_bad_framing_is_a_400(srv, headers, message):
    mark = srv.mark()
    sock = connect(srv)
    sock.sendall(post_raw(b"Content-Type: application/json\r\n" + headers, b"{}"))
    status, error = status_and_error(read_all(sock))
    sock.close()
    assert status == 400 and message in error, error
    srv.assert_quiet(mark)


def test_a_five_megabyte_body_gets_a_413_with_the_limit(srv):
    from femtogpt.app.serve_http import MAX_BODY_BYTES
    mark = srv.mark()
    # As most clients do: the whole body first, then the answer.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/api/runs/0/sample", body=b" " * (5 * MIB),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413 and f"{MAX_BODY_BYTES:,} bytes" in error, error
    assert response.getheader("Connection") == "close"
    conn.close()
    # On a raw socket: the 413, then the server closes (no reset on the way).
    sock = connect(srv)
    sock.sendall(post_raw(b"Content-Type: application/json\r\nContent-Length: "
                          + str(5 * MIB).encode() + b"\r\n", b" " * (5 * MIB)))
    status, error = status_and_error(read_all(sock))
    sock.close()
    assert status == 413 and f"{MAX_BODY_BYTES:,}" in error
    # A client that asks first (Expect: 100-continue, as curl does) is told
    # before it sends anything.
    sock = connect(srv)
    sock.sendall(post_raw(b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                          b"Content-Length: " + str(5 * MIB).encode() + b"\r\n"))
    status, error = status_and_error(read_all(sock))
    sock.close()
    assert status == 413 and f"{MAX_BODY_BYTES:,}" in error
    srv.assert_quiet(mark)


def test_a_post_without_a_content_type_is_a_400(srv):
    mark = srv.mark()
    sock = connect(srv)
    sock.sendall(post_raw(b"Content-Length: 2\r\n", b"{}"))
    status, error = status_and_error(read_all(sock))
    sock.close()
    assert status == 400 and "application/json" in error
    srv.assert_quiet(mark)


def test_a_client_that_leaves_in_the_middle_of_a_json_answer(srv):
    mark = srv.mark()
    for _ in range(5):
        sock = connect(srv, receive_buffer=4096)
        sock.sendall(b"GET /api/runs/0/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        reset(sock)                     # some megabytes still to come
    assert get(srv, "/api/runs")[0] == 200
    srv.assert_quiet(mark)


def test_a_client_that_leaves_before_its_error_answer(srv):
    mark = srv.mark()
    for i in range(20):
        sock = connect(srv)
        # A foreign Host (403), a request that is not JSON (400), no Host (403).
        sock.sendall([b"GET /api/runs HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                      post_raw(b"Content-Type: application/json\r\nContent-Length: 5\r\n",
                               b"{nope"),
                      b"GET /api/runs HTTP/1.1\r\n\r\n"][i % 3])
        reset(sock)
    assert get(srv, "/api/runs")[0] == 200
    srv.assert_quiet(mark)


@pytest.mark.parametrize("request_bytes", [
    post_raw(b"Content-Type: application/json\r\nContent-Length: 43\r\n",
             b'{"prompt": "To", "max_new_tokens": 2000}   '),
    b"GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
], ids=["sample", "live"])
def test_a_client_that_leaves_in_the_middle_of_an_event_stream(srv, request_bytes):
    mark = srv.mark()
    sock = connect(srv, timeout=30)
    sock.sendall(request_bytes)
    first = b""
    while b"event: " not in first:
        chunk = sock.recv(4096)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200")
    reset(sock)
    srv.assert_quiet(mark)


def test_with_verbose_a_client_that_left_is_one_line(big_run, tmp_path):
    server = ServerProcess(big_run, tmp_path / "stderr.txt", "--verbose")
    try:
        mark = server.mark()
        sock = connect(server, timeout=30)
        sock.sendall(post_raw(b"Content-Type: application/json\r\nContent-Length: 40\r\n",
                              b'{"prompt": "To", "max_new_tokens": 2000}'))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        reset(sock)
        server.settle()
        text = server.stderr(mark)
        assert "Traceback" not in text
        gone = [line for line in text.splitlines() if "went away" in line]
        assert len(gone) == 1 and "/api/runs/0/sample" in gone[0], text
    finally:
        server.close()


def test_runs_list_names_and_the_terminal_keeps_the_paths(srv, big_run):
    status, payload = get(srv, "/api/runs")
    [info] = json.loads(payload)
    assert status == 200 and info["name"] == "run" and "path" not in info
    assert os.path.dirname(big_run) not in payload.decode()     # nothing of the disk
    assert big_run in srv.stderr()                              # the start-up lines


def test_idle_connections_cannot_make_more_threads_than_the_bound(run_dir, tmp_path):  # noqa: F811
    from femtogpt.app.serve_http import MAX_HANDLERS
    timeout = 2.0
    server = ServerProcess(run_dir, tmp_path / "stderr.txt", prelude=(
        f"import femtogpt.app.serve_http as h\nh.REQUEST_TIMEOUT_S = {timeout}\n"))
    idle = []
    try:
        mark = server.mark()
        for i in range(4 * MAX_HANDLERS):
            sock = connect(server, timeout=timeout + 10)
            if i % 2:                   # half a request, then nothing more
                sock.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127")
            idle.append(sock)
        time.sleep(0.5)
        peak = server.threads()
        assert peak <= server.rest + MAX_HANDLERS, (peak, server.rest)
        status, payload = get(server, "/api/runs")
        assert status == 200 or (status == 503 and f"{MAX_HANDLERS}" in
                                 json.loads(payload)["error"]), (status, payload[:200])
        # Each idle connection is closed: at once with a 503 beyond the bound,
        # after the timeout within it (with a 408 when it sent part of a request).
        started = time.monotonic()
        answers = [read_all(sock, timeout + 5) for sock in idle]
        assert time.monotonic() - started < timeout + 5
        for answer in answers:
            assert answer == b"" or answer.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408"))
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 2 * MAX_HANDLERS
        server.settle()
        assert server.threads() <= server.rest
        assert get(server, "/api/runs")[0] == 200
        server.assert_quiet(mark)
    finally:
        for sock in idle:
            sock.close()
        server.close()
