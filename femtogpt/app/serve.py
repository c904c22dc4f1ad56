"""`femtogpt serve`: a playground in the browser for runs and models.

The server is the standard library's HTTP server with one thread per
connection while it is served, at most MAX_HANDLERS of them (serve_http.py
says why 16, and what clients that misbehave get: a 503 beyond the bound,
a 400 for a body framed wrongly, a 413 past MAX_BODY_BYTES, a 408 for a
request not whole in REQUEST_TIMEOUT_S; one that goes away ends its handler
quietly). Streams are server-sent events. It only reads the run folders: a
training process is never touched, and a checkpoint it rewrites (always
atomically) is read again, whole. The page is told each run's name, never
where it is on the disk; the terminal's start-up lines say that.

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

import os
import sys

from ..errors import FemtoGPTError
from .serve_api import Handler, Server, _EventStream, sample_options
from .serve_http import MAX_BODY_BYTES, MAX_HANDLERS, BadRequest, Forbidden
from .serve_runs import Busy, Source, in_a_thread_of_its_own, read_rows

# The pieces, by idea: serve_http.py (HTTP framing, the handler base),
# serve_runs.py (the runs and their models), serve_api.py (the routes and the
# server); this module is the command. Their names are handed on from here.
__all__ = ["BadRequest", "Busy", "Forbidden", "Handler", "MAX_BODY_BYTES", "MAX_HANDLERS",
           "Server", "Source", "_EventStream", "in_a_thread_of_its_own", "make_server",
           "read_rows", "sample_options", "serve_command"]


def make_server(paths, host="127.0.0.1", port=8000, verbose=False, dtype="fp32", threads=0):
    """A Server for the given run folders, checkpoint files or model folders
    (each checked to hold a model now), bound but not yet serving. threads:
    OpenMP threads for the models (0: OMP_NUM_THREADS, else all cores)."""
    from ..errors import ConfigError
    sources = []
    for i, path in enumerate(paths):
        source = Source(i, path, dtype, threads)
        if not os.path.exists(path):
            raise ConfigError(f"nothing to serve at {path}: it does not exist")
        try:
            in_a_thread_of_its_own(source.peek)
        except FemtoGPTError as err:
            raise ConfigError(f"cannot serve {path}: {err}") from None
        sources.append(source)
    try:
        return Server((host, port), sources, verbose)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_command(args):
    from .. import _core
    from .sample import check_dtype
    check_dtype(args.dtype)
    if args.threads:
        _core.set_num_threads(args.threads)
    server = make_server(args.out, args.host, args.port, args.verbose, args.dtype, args.threads)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"femtogpt: warning: serving on {args.host}, not only this machine: anyone who "
              f"can reach port {port} can run the models (there is no login)", file=sys.stderr)
    print(f"serving {len(server.sources)} run(s) on http://{host}:{port}  (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    for source in server.sources:       # where they are: here, not on the page
        print(f"  {source.index}: {source.name}  {source.path}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stopping.set()
        server.server_close()
    return 0

