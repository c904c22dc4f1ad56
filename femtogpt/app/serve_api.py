"""The routes of `femtogpt serve` (listed in serve.py) over the HTTP base of
serve_http.py and the runs of serve_runs.py: the page's files, the runs and
their metrics, the live stream, sampling and the view inside a model.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np

from ..errors import FemtoGPTError
from .serve_http import BadRequest, BoundedHTTPServer, JSONHandler, Refused, _ClientGone
from .serve_runs import Busy, in_a_thread_of_its_own, read_rows, read_rows_from

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_PROMPT_CHARS = 20000
MAX_NEW_TOKENS = 2000
EVAL_SAMPLE_TOKENS = 200
LIVE_POLL_S = 0.5


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
        pass        # stream_sample flushes its output; each write was sent as an event already


class Handler(JSONHandler):
    # -- routing

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method):
        path = self.path.split("?", 1)[0]
        try:
            self.body_length()          # the framing first: a request misread is no request
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
        except Refused as err:
            self.send_error_json(err.status, str(err))
        except Busy as err:
            self.send_error_json(503, str(err))
        except FemtoGPTError as err:
            # A prompt the tokenizer cannot encode, a checkpoint being damaged...
            # (said with the runs' names: the page is not told where they are)
            self.send_error_json(422, self.server.public(str(err)))
        except _ClientGone:
            raise                       # handle() ends it quietly
        except Exception as err:        # a bug: say so, keep serving
            print(f"femtogpt serve: {type(err).__name__}: {err}", file=sys.stderr)
            self.send_error_json(500, self.server.public(
                f"internal error: {type(err).__name__}: {err}"))

    def _source(self, text):
        if not (text.isascii() and text.isdigit()):
            raise BadRequest(f"no run {text[:40]!r}")
        try:
            return self.server.sources[int(text)]
        except IndexError:
            raise BadRequest(f"no run {text!r}") from None

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
                self.send_event("error", {"error": self.server.public(str(err))})
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
                self._write(b": ping\n\n")     # a comment line: finds a vanished client
                last_beat = time.monotonic()
            self.wait_unless_gone(LIVE_POLL_S)


class Server(BoundedHTTPServer):
    """The server of the runs given, with the sample of each one's newest model."""

    def __init__(self, address, sources, verbose=False):
        super().__init__(address, Handler, verbose)
        self.sources = sources
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

        def sample():
            with source.use() as (model, tokenizer):
                sink = _Collect()
                stream_sample(model, tokenizer, "\n", EVAL_SAMPLE_TOKENS, 0.8, 200, None, 0,
                              out=sink, end="")
                return "".join(sink.pieces)
        try:
            # the live stream's handler lives as long as the page: its thread
            # must not keep an OpenMP pool (see in_a_thread_of_its_own)
            text = in_a_thread_of_its_own(sample)
        except (FemtoGPTError, BadRequest) as err:
            text = f"(no sample: {err})"
        with self._sample_lock:
            self._samples[source.index] = (key, text)      # the newest only
        return text

    def public(self, text):
        """text with each run's place on the disk replaced by its name."""
        for source in self.sources:
            text = text.replace(source.path, source.name)
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
        pass        # stream_sample flushes its output; the pieces are already kept

