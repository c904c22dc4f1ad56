"""The guard around every command: a user's error becomes one line on stderr
and an exit status (2 for what the user can fix, 3 for a numerical failure,
130 for Ctrl-C), and in an MPI job one rank's error stops them all.

The CLI (cli.py) and `python -m femtogpt.sample` (sample.py) both run their
commands through run_guarded.
"""
import os
import sys

from ..errors import FemtoGPTError


def run_guarded(function, args):
    """Run a command; user errors become one line on stderr and exit status 2.

    In a distributed run, an error that every rank has met together (flagged
    `agreed`) is printed by rank 0 and each rank exits normally; any other
    error is printed by the rank that met it, which then aborts the whole MPI
    job: the other ranks would otherwise wait for it.
    """
    try:
        return _run_reporting_errors(function, args)
    except BaseException as err:
        if not _in_mpi_job(args):
            raise
        # Here only with --debug, or for an unexpected error.
        import traceback
        if getattr(err, "agreed", False):
            if args.comm.rank == 0:
                traceback.print_exc()
            return 3 if isinstance(err, FloatingPointError) else 2
        traceback.print_exc()
        args.comm.abort(1)
        raise


def _in_mpi_job(args):
    comm = getattr(args, "comm", None)
    return comm is not None and comm.distributed


def _report(args, err, code):
    from ..train.distributed import launched_rank
    comm = getattr(args, "comm", None)
    if not _in_mpi_job(args):
        # (started as several ranks that could not connect, e.g. without mpi4py:
        # they all meet the same error, and the first says it)
        if launched_rank() == 0:
            print(f"femtogpt: error: {err}", file=sys.stderr)
        return code
    if getattr(err, "agreed", False):
        if comm.rank == 0:
            print(f"femtogpt: error: {err}", file=sys.stderr)
        return code
    print(f"femtogpt: error on rank {comm.rank}: {err}; stopping all ranks",
          file=sys.stderr, flush=True)
    comm.abort(code)
    return code


def _run_reporting_errors(function, args):
    try:
        return function(args)
    except FemtoGPTError as err:
        if getattr(args, "debug", False):
            raise
        return _report(args, err, 2)
    except FloatingPointError as err:
        if getattr(args, "debug", False):
            raise
        return _report(args, err, 3)
    except BrokenPipeError:
        # `femtogpt sample | head`: the reader left; not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("femtogpt: interrupted", file=sys.stderr)
        if _in_mpi_job(args):
            args.comm.abort(130)
        return 130


def show_notes():
    """femtogpt's warnings (an unverifiable old checkpoint...) as one-line notes."""
    import warnings
    from ..errors import UnverifiedCheckpointWarning
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedCheckpointWarning):
            print(f"femtogpt: note: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
