"""`femtogpt serve`: a playground in the browser for runs and models.

The server is the standard library's ThreadingHTTPServer: one thread per
connection, so several tabs are served at once, and a thread ends when its
client goes (a write to a closed socket fails; every socket has a timeout, so
a stalled client cannot hold a thread for ever). Streams are server-sent
events. It only reads the run folders: a training process is never touched,
and a checkpoint it rewrites (always atomically) is read again, whole.

Routes (JSON unless said otherwise):
  GET  /                      the page (femtogpt/app/web/), nothing from the internet
  GET  /api/runs              every run or model given, and what it is
  GET  /api/runs/N/metrics    its metrics.jsonl rows
  GET  /api/live              events: new metrics rows, run changes, and a
                              sample from the newest model at each evaluation
  POST /api/runs/N/sample     events: the continuation of a prompt, token by
                              token (femtogpt sample's generator and seed)
  POST /api/runs/N/analyze    per-token loss and top-10 next tokens (probe.py)
  POST /api/runs/N/attention  one layer's and head's attention pattern
Bad input is a 4xx with {"error": "..."}; nothing the page sends can crash
the server.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ..errors import FemtoGPTError

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_CHARS = 20000
MAX_NEW_TOKENS = 2000
EVAL_SAMPLE_TOKENS = 200
MODELS_PER_RUN = 4          # models (for concurrent requests) kept per run
SOCKET_TIMEOUT_S = 30
LIVE_POLL_S = 0.5


class BadRequest(Exception):
    """Input the page should not have sent: its message goes back as a 400."""


class Busy(Exception):
    """Every model of a run is in use: a 503, try again."""


# ----------------------------------------------------------------------------- runs

class Source:
    """One thing given to serve: a run folder, a checkpoint file or a Hugging
    Face folder. Models are loaded on demand, one per concurrent request, and
    loaded again when the checkpoint on disk changes."""

    def __init__(self, index, path):
        self.index, self.path = index, os.path.abspath(path)
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self._lock = threading.Lock()
        self._idle = []             # [(key, model, tokenizer)]
        self._in_use = 0
        self._freed = threading.Condition(self._lock)

    # -- what it is

    def checkpoint_file(self):
        """The file a model is read from, as `femtogpt sample --out` chooses."""
        from ..files import BEST_NAME, LATEST_NAME
        if os.path.isfile(self.path):
            return self.path
        for name in (BEST_NAME, LATEST_NAME):
            file = os.path.join(self.path, name)
            if os.path.isfile(file):
                return file
        return self.path            # a Hugging Face folder

    def _key(self):
        file = self.checkpoint_file()
        try:
            st = os.stat(file)
        except OSError:
            return (file, None)
        return (file, st.st_mtime_ns, st.st_size)

    def info(self):
        """What the page shows about it: read fresh each time (a run may be training)."""
        from ..files import LATEST_NAME, TensorFile
        info = {"id": self.index, "path": self.path, "name": os.path.basename(self.path)}
        rows = read_rows(self.metrics_path)
        state = os.path.join(self.path, LATEST_NAME)
        config = {}
        if os.path.isfile(state):
            try:
                with TensorFile(state) as f:
                    meta = f.meta
                config = meta.get("train_config") or {}
                info["iter"] = meta.get("iter")
            except FemtoGPTError as err:
                info["problem"] = str(err)
        info["config"] = {k: config.get(k) for k in (
            "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
            "learning_rate", "tokenizer", "vocab_size", "data") if k in config}
        if rows:
            best = min(rows, key=lambda r: r.get("val_loss", math.inf))
            info["best_val_loss"] = best.get("val_loss")
            info["best_val_bpc"] = best.get("val_bpc")
            info["evaluations"] = len(rows)
            info["iter"] = max(info.get("iter") or 0, rows[-1].get("iter", 0))
        try:
            info["modified"] = os.stat(self.metrics_path).st_mtime
        except OSError:
            info["modified"] = None
        try:
            model, tokenizer = self.peek()
            info["parameters"] = model.num_parameters()
            info["model"] = {"n_layer": model.config.n_layer, "n_head": model.config.n_head,
                             "n_embd": model.config.n_embd,
                             "block_size": model.config.block_size,
                             "vocab_size": model.config.vocab_size}
            info["tokenizer"] = tokenizer.to_dict()["type"]
        except FemtoGPTError as err:
            info.setdefault("problem", str(err))
        return info

    # -- models

    def peek(self):
        """A model and tokenizer to read (not to run): loads one if none is idle."""
        with self.use() as (model, tokenizer):
            return model, tokenizer

    def use(self):
        return _Lease(self)

    def _acquire(self, timeout=60.0):
        from ..files import load
        key = self._key()
        deadline = time.monotonic() + timeout
        with self._lock:
            self._idle = [entry for entry in self._idle if entry[0] == key]
            while not self._idle and self._in_use >= MODELS_PER_RUN:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy("every model of this run is busy; try again")
                self._freed.wait(left)
            if self._idle:
                entry = self._idle.pop()
                self._in_use += 1
                return entry
            self._in_use += 1
        try:
            model, tokenizer = load(key[0])
        except BaseException:
            with self._lock:
                self._in_use -= 1
                self._freed.notify()
            raise
        model.eval()
        return (key, model, tokenizer)

    def _release(self, entry):
        with self._lock:
            self._in_use -= 1
            if entry[0] == self._key() and len(self._idle) < MODELS_PER_RUN:
                self._idle.append(entry)
            self._freed.notify()


class _Lease:
    def __init__(self, source):
        self.source, self.entry = source, None

    def __enter__(self):
        self.entry = self.source._acquire()
        return self.entry[1], self.entry[2]

    def __exit__(self, *exc):
        self.source._release(self.entry)
        return False


def read_rows(path, start=0):
    """metrics.jsonl's rows from byte offset start, and the offset after the
    last whole line (a line being written is left for next time)."""
    rows, _ = read_rows_from(path, start)
    return rows


def read_rows_from(path, start=0):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return [], start
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, start + end


# ----------------------------------------------------------------------------- options

def _number(body, name, kind, default, low, high, low_open=False):
    value = body.get(name, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a number")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {str(value)[:40]!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise BadRequest(f"{name} must be an integer, got {value}")
    if not (math.isfinite(number) and (low < number if low_open else low <= number)
            and number <= high):
        bracket = "(" if low_open else "["
        raise BadRequest(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return number


def sample_options(body, vocab_size):
    """The sampling settings from the page, checked as `femtogpt sample` checks them."""
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"the prompt is {len(prompt):,} characters; the limit is "
                         f"{MAX_PROMPT_CHARS:,}")
    options = {
        "prompt": prompt or "\n",       # as `femtogpt sample` without --prompt
        "temperature": _number(body, "temperature", float, 0.8, 0.0, 100.0),
        "top_k": _number(body, "top_k", int, 200, 1, 10**9),
        "top_p": _number(body, "top_p", float, None, 0.0, 1.0, low_open=True),
        "max_new_tokens": _number(body, "max_new_tokens", int, 200, 1, MAX_NEW_TOKENS),
        "seed": _number(body, "seed", int, None, 0, 2**63 - 1),
    }
    if options["top_p"] is not None and np.float32(options["top_p"]) == 0.0:
        raise BadRequest(f"top_p must be at least {np.finfo(np.float32).tiny:.3g}, "
                         f"got {options['top_p']}")
    if options["seed"] is None:
        options["seed"] = int(np.random.SeedSequence().entropy % 2**63)
    return options


# ----------------------------------------------------------------------------- HTTP

class _ClientGone(Exception):
    pass


class Forbidden(Exception):
    """A request from somewhere this server does not serve: a 403."""


class _EventStream:
    """A file-like writer that sends what stream_sample writes as events: the
    prompt first, then each piece of text as it is generated."""

    def __init__(self, handler):
        self.handler, self.wrote_prompt, self.pieces = handler, False, []

    def write(self, text):
        if not self.wrote_prompt:
            self.wrote_prompt = True
            self.handler.send_event("prompt", {"text": text})
            return
        self.pieces.append(text)
        self.handler.send_event("token", {"text": text})

    def flush(self):
        pass


class Handler(BaseHTTPRequestHandler):
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

    # -- routing

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method):
        path = self.path.split("?", 1)[0]
        self.events_started = False
        try:
            self._check_origin(method)
            if method == "GET" and path in STATIC:
                return self._static(*STATIC[path])
            parts = path.strip("/").split("/")
            if parts[:1] != ["api"]:
                return self.send_error_json(404, f"no such page: {path}")
            if method == "GET" and parts == ["api", "runs"]:
                return self.send_json([s.info() for s in self.server.sources])
            if method == "GET" and parts == ["api", "live"]:
                return self._live()
            if len(parts) == 4 and parts[1] == "runs":
                source = self._source(parts[2])
                action = (method, parts[3])
                if action == ("GET", "metrics"):
                    return self.send_json(read_rows(source.metrics_path))
                if action == ("POST", "sample"):
                    return self._sample(source, self._body())
                if action == ("POST", "analyze"):
                    return self._analyze(source, self._body())
                if action == ("POST", "attention"):
                    return self._attention(source, self._body())
            self.send_error_json(404, f"no such address: {method} {path}")
        except BadRequest as err:
            self.send_error_json(400, str(err))
        except Forbidden as err:
            self.send_error_json(403, str(err))
        except Busy as err:
            self.send_error_json(503, str(err))
        except FemtoGPTError as err:
            # A prompt the tokenizer cannot encode, a checkpoint being damaged...
            self.send_error_json(422, str(err))
        except _ClientGone:
            self.close_connection = True
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as err:        # a bug: say so, keep serving
            print(f"femtogpt serve: {type(err).__name__}: {err}", file=sys.stderr)
            try:
                self.send_error_json(500, f"internal error: {type(err).__name__}: {err}")
            except (OSError, _ClientGone):
                pass

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

    def _source(self, text):
        if not (text.isascii() and text.isdigit()):
            raise BadRequest(f"no run {text[:40]!r}")
        try:
            return self.server.sources[int(text)]
        except IndexError:
            raise BadRequest(f"no run {text!r}") from None

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

    # -- the model

    def _sample(self, source, body):
        from .sample import stream_sample
        with source.use() as (model, tokenizer):
            options = sample_options(body, model.config.vocab_size)
            prompt = options.pop("prompt")
            # Checked before the stream starts, so that it can still be a 4xx.
            ids = tokenizer.encode(prompt, what="prompt")
            if not ids:
                raise BadRequest("the prompt is empty")
            self.start_events()
            out = _EventStream(self)
            try:
                stream_sample(model, tokenizer, prompt, options["max_new_tokens"],
                              options["temperature"], options["top_k"], options["top_p"],
                              options["seed"], out=out, end="")
            except FemtoGPTError as err:
                self.send_event("error", {"error": str(err)})
                return
            self.send_event("done", {"text": "".join(out.pieces), "seed": options["seed"]})

    def _analyze(self, source, body):
        from .probe import analyze
        text = body.get("text")
        if not isinstance(text, str):
            raise BadRequest("text must be text")
        if len(text) > MAX_PROMPT_CHARS:
            raise BadRequest(f"the text is {len(text):,} characters; the limit is "
                             f"{MAX_PROMPT_CHARS:,}")
        with source.use() as (model, tokenizer):
            self.send_json(analyze(model, tokenizer, text))

    def _attention(self, source, body):
        from .probe import attention
        text = body.get("text")
        if not isinstance(text, str):
            raise BadRequest("text must be text")
        if len(text) > MAX_PROMPT_CHARS:
            raise BadRequest("the text is too long")
        with source.use() as (model, tokenizer):
            layer = _number(body, "layer", int, 0, 0, model.config.n_layer - 1)
            head = _number(body, "head", int, 0, 0, model.config.n_head - 1)
            self.send_json(attention(model, tokenizer, text, layer, head))

    # -- live runs

    def _live(self):
        """Events while the page is open: new metrics rows of every run, its
        changed summary, and a short sample from its newest model at each
        evaluation (made here, from the files: the trainer is not involved)."""
        self.start_events()
        sources = self.server.sources
        offsets = [read_rows_from(s.metrics_path)[1] for s in sources]
        # What each run's newest model writes now, so the page has a sample at once.
        for i, source in enumerate(sources):
            rows = read_rows(source.metrics_path)
            self.send_event("sample", {"run": i, "iter": rows[-1].get("iter") if rows else None,
                                       "text": self.server.eval_sample(source)})
        last_beat = time.monotonic()
        while not self.server.stopping.is_set():
            for i, source in enumerate(sources):
                try:
                    size = os.path.getsize(source.metrics_path)
                except OSError:
                    size = 0
                if size < offsets[i]:
                    # Rewritten shorter (a resumed run drops the evaluations it
                    # will redo, or --overwrite started again): send it whole.
                    rows, offsets[i] = read_rows_from(source.metrics_path)
                    self.send_event("reset", {"run": i, "rows": rows})
                    self.send_event("info", source.info())
                    continue
                rows, offsets[i] = read_rows_from(source.metrics_path, offsets[i])
                if not rows:
                    continue
                self.send_event("metrics", {"run": i, "rows": rows})
                self.send_event("info", source.info())
                self.send_event("sample", {"run": i, "iter": rows[-1].get("iter"),
                                           "text": self.server.eval_sample(source)})
            if time.monotonic() - last_beat > 10:
                try:                        # a comment line: finds a vanished client
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
                except (OSError, ValueError):
                    return
                last_beat = time.monotonic()
            self.server.stopping.wait(LIVE_POLL_S)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, sources, verbose=False):
        super().__init__(address, Handler)
        self.sources = sources
        self.verbose = verbose
        self.loopback = address[0] in ("127.0.0.1", "localhost", "::1")
        self.stopping = threading.Event()
        self._samples = {}          # run index -> (checkpoint key, its sample)
        self._sample_lock = threading.Lock()

    def eval_sample(self, source):
        """A short sample from the run's newest model (one per checkpoint)."""
        from .sample import stream_sample
        key = source._key()
        with self._sample_lock:
            if self._samples.get(source.index, (None,))[0] == key:
                return self._samples[source.index][1]
        try:
            with source.use() as (model, tokenizer):
                sink = _Collect()
                stream_sample(model, tokenizer, "\n", EVAL_SAMPLE_TOKENS, 0.8, 200, None, 0,
                              out=sink, end="")
                text = "".join(sink.pieces)
        except (FemtoGPTError, BadRequest) as err:
            text = f"(no sample: {err})"
        with self._sample_lock:
            self._samples[source.index] = (key, text)      # the newest only
        return text

    def shutdown(self):
        self.stopping.set()
        super().shutdown()


class _Collect:
    def __init__(self):
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)

    def flush(self):
        pass


def make_server(paths, host="127.0.0.1", port=8000, verbose=False):
    """A Server for the given run folders, checkpoint files or model folders
    (each checked to hold a model now), bound but not yet serving."""
    from ..errors import ConfigError
    sources = []
    for i, path in enumerate(paths):
        source = Source(i, path)
        if not os.path.exists(path):
            raise ConfigError(f"nothing to serve at {path}: it does not exist")
        try:
            source.peek()
        except FemtoGPTError as err:
            raise ConfigError(f"cannot serve {path}: {err}") from None
        sources.append(source)
    try:
        return Server((host, port), sources, verbose)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_command(args):
    from .. import _core
    if args.threads:
        _core.set_num_threads(args.threads)
    server = make_server(args.out, args.host, args.port, args.verbose)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"femtogpt: warning: serving on {args.host}, not only this machine: anyone who "
              f"can reach port {port} can run the models (there is no login)", file=sys.stderr)
    print(f"serving {len(server.sources)} run(s) on http://{host}:{port}  (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stopping.set()
        server.server_close()
    return 0

