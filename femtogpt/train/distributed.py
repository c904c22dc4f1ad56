"""Data-parallel training over MPI: which rank this is, and the collectives training needs.

    mpiexec -n 2 femtogpt train ...          (the launcher is detected)
    srun femtogpt train --distributed ...    (any other MPI launcher)

Every rank holds the whole model and optimizer. The global batch stays
--batch-size: each rank draws its own share of it from its own random stream.
Each step, after backward, one in-place allreduce sums the model's flat gradient
block (each rank's gradient pre-weighted by its share of the batch) together
with a few scalars in the block's tail: the loss and a stop request. Clipping
and AdamW then run on identical numbers on every rank, so the weights stay
identical without ever being sent. Rank 0 alone prints, writes metrics and
checkpoints; evaluation batches are shared out and their losses summed.

A rank that dies is normally noticed by the launcher, which stops the others.
As a second line of defence, every collective of a step, an evaluation, a
save or the start-up check waits at most `timeout` seconds and then raises
RankLostError, which the command line turns into a message and an MPI abort,
so a run never hangs forever. (Rank 0's own work between collectives, such as
writing a checkpoint, counts towards the other ranks' wait.)
"""
import os
import pickle
import signal
import sys
import time

import numpy as np

from ..errors import ConfigError, FemtoGPTError

# Environment variables through which MPI launchers tell a process the job size:
# Open MPI's mpirun, MPICH's and Intel MPI's Hydra (PMI), MVAPICH2.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")

INSTALL_HINT = "pip install 'femtogpt[mpi]' (mpi4py and MPICH from PyPI)"

# Slots of the gradient block's tail (model.GRAD_TAIL floats) that a step sends.
TAIL_LOSS = 0       # this rank's loss times its share of the batch: sums to the mean
# 1.0 on a rank that received the signal: any rank stopping stops all, and every
# rank knows which signal it was (SIGTERM wins if both came).
TAIL_STOP_SLOTS = {signal.SIGINT: 1, signal.SIGTERM: 2}


class RankLostError(FemtoGPTError):
    """Another rank stopped answering: it died, or it is stuck."""


def launched_size():
    """Ranks the MPI launcher started, read from its environment (1 if none)."""
    for name in LAUNCHER_SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launched_rank():
    """This process's rank as the launcher's environment says (0 if none)."""
    for name in LAUNCHER_RANK_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def batch_share(batch_size, rank, size):
    """Sequences of the global batch that `rank` computes: an even split, the
    first batch_size % size ranks taking one more."""
    return batch_size // size + (1 if rank < batch_size % size else 0)


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Solo:
    """The single-process 'communicator': every collective is the identity."""

    rank = 0
    size = 1
    local_size = 1
    distributed = False

    def allreduce_sum(self, array, what="the gradient sum"):
        return array

    def gather(self, obj):
        return [obj]


class MPIComm:
    """COMM_WORLD through mpi4py, every wait bounded by `timeout` seconds."""

    distributed = True

    def __init__(self, timeout=600.0):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError(f"distributed training needs mpi4py and an MPI library: "
                              f"{INSTALL_HINT}") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()    # ranks sharing this machine's cores
        local.Free()
        self.timeout = float(timeout)

    def _wait(self, request, what):
        # Test() in a loop instead of Wait(), so that a silent peer cannot keep
        # us here forever. The first few milliseconds spin (a step's collective
        # usually completes in well under that); after that, short sleeps leave
        # the core to whatever else runs.
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                raise RankLostError(
                    f"no answer from the other ranks for {self.timeout:g} s, waiting "
                    f"for {what} (a rank died or is stuck; --comm-timeout sets this limit)")
            if now - start > 0.002:
                time.sleep(0.0002)

    def allreduce_sum(self, array, what="the gradient sum"):
        """Sum a contiguous float32/float64 array over all ranks, in place."""
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        self._wait(request, what)
        return array

    def _exchange(self, obj, what, root):
        # Python objects between ranks with bounded waits only. mpi4py's own
        # gather/allgather block in MPI until every rank arrives, so a rank
        # stopped between a barrier and the gather would hang the others
        # forever. Here each rank's pickle goes through nonblocking byte
        # collectives: first every size, then the bytes themselves. (Pickle
        # is what mpi4py uses too; it only ever carries our own ranks' data.)
        MPI = self.MPI
        payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
                                dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        self._wait(self.comm.Iallgather(np.array([payload.size], dtype=np.int64), sizes),
                   what)
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        receives = root is None or self.rank == root
        received = np.empty(int(sizes.sum()) if receives else 0, dtype=np.uint8)
        layout = [received, (sizes, offsets), MPI.BYTE]
        if root is None:
            request = self.comm.Iallgatherv(payload, layout)
        else:
            request = self.comm.Igatherv(payload, layout if receives else None, root=root)
        self._wait(request, what)
        if not receives:
            return None
        return [pickle.loads(received[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def gather(self, obj):
        """Rank 0 gets [obj of rank 0, obj of rank 1, ...]; the others get None."""
        return self._exchange(obj, "the checkpoint's random states", root=0)

    def allgather(self, obj):
        """Every rank gets [obj of rank 0, obj of rank 1, ...]."""
        return self._exchange(obj, "the start-up check", root=None)

    # MPI_Abort has the process manager kill every rank at once, and it may
    # do so before it has passed on what this rank just wrote to stderr: the
    # reason would be lost (MPICH's hydra lost it in 2 of 14 runs of the
    # stuck-rank test here, and once in CI). A pause first lets the launcher
    # forward the message; the job is stopping anyway.
    ABORT_GRACE = 0.5

    def abort(self, code):
        """Stop every rank (after this one printed why)."""
        sys.stderr.flush()
        time.sleep(self.ABORT_GRACE)
        self.comm.Abort(code)


def connect(distributed, timeout):
    """The communicator for this process: MPI when asked or when launched by mpiexec."""
    n = launched_size()
    if not distributed and n <= 1:
        return Solo()
    if not distributed:
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ConfigError(f"started by an MPI launcher as one of {n} ranks, but mpi4py "
                              f"is not installed, so the ranks cannot work together: "
                              f"{INSTALL_HINT}") from None
    if not (timeout > 0):
        raise ConfigError(f"--comm-timeout must be positive, got {timeout}")
    return MPIComm(timeout)


def default_threads(comm):
    """OpenMP threads per rank when --threads is not given: OMP_NUM_THREADS if
    set, else this machine's cores shared out among the ranks running on it."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return 0
    return max(1, available_cores() // comm.local_size)


def rank_dropout_seed(seed, rank):
    """Each rank's dropout masks must differ (they drop units of different
    sequences); rank 0 keeps the run's own seed."""
    if rank == 0:
        return seed
    return (seed + rank * 0x5851F42D4C957F2D) % 2**63


def fingerprint(array):
    """A cheap checksum of a float array's bytes, to check the ranks agree."""
    import zlib
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8))
