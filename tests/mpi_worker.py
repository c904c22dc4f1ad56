"""Run under mpiexec by test_distributed.py: a few distributed training steps.

    mpiexec -n N python mpi_worker.py CONFIG_JSON OUT_NPZ STEPS

Every rank draws its own share of each batch, exactly as Run.train_step does,
and hands it to train_step; rank 0 gathers what every rank drew and saves it
with what the run computed (the summed gradient of the first step, each step's
loss, the final weights), so that the test can redo the same steps in one
process on the concatenated batches.
"""
import json
import sys

import numpy as np

from femtogpt.train.batches import get_batch
from femtogpt.train.distributed import MPIComm, fingerprint
from femtogpt.train import Run, TrainConfig


def main():
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    out_path, steps = sys.argv[2], int(sys.argv[3])
    comm = MPIComm(timeout=120)
    run = Run(cfg, log=lambda message: None, comm=comm)
    xs, ys, losses, first_grads = [], [], [], None
    for step in range(steps):
        # grad_accum micro-batches per step, each this rank's share of a batch.
        micro = [get_batch(run.train_ids, run.local_batch, cfg.block_size, run.rng_train)
                 for _ in range(cfg.grad_accum)]
        loss, lr, stop = run.train_step(batch=micro if len(micro) > 1 else micro[0])
        x = np.concatenate([b[0] for b in micro])
        y = np.concatenate([b[1] for b in micro])
        xs.append(x)
        ys.append(y)
        losses.append(loss)
        if step == 0:
            first_grads = run.model.grads_flat.copy()
    batches = comm.gather((np.stack(xs), np.stack(ys)))
    fingerprints = comm.gather(fingerprint(run.model.params_flat))
    if comm.rank == 0:
        # (steps, B, T): each step's global batch, rank 0's rows first.
        x_all = np.concatenate([b[0] for b in batches], axis=1)
        y_all = np.concatenate([b[1] for b in batches], axis=1)
        np.savez(out_path, x=x_all, y=y_all, losses=np.array(losses),
                 first_grads=first_grads, params=run.model.params_flat,
                 local_batches=np.array([b[0].shape[1] for b in batches]),
                 fingerprints=np.array(fingerprints, dtype=np.int64),
                 threads=np.array(__import__("femtogpt").get_num_threads()))


if __name__ == "__main__":
    main()
