"""scripts/bench.py's femtogpt workers: the sgemm yardstick, one training step
of a preset, sampling, and the MPI-rank step. Each runs in its own process."""
import math
import statistics
import sys
import time

from bench_common import SGEMM_N, VOCAB, peak_rss_mb, preset_cfg, random_batch, rss_now_mb, summarise_steps, time_steps


def worker_sgemm(spec):
    import numpy as np
    threads, n = spec["threads"], SGEMM_N
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    info = {}
    if spec["impl"] == "torch":
        import torch
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        matmul = lambda: torch.mm(ta, tb)             # noqa: E731
        info["library"] = f"torch {torch.__version__} (torch.mm)"
    else:
        # numpy's own OpenBLAS, limited to the benchmark's thread count (the
        # environment variables already say so; threadpoolctl makes sure).
        from threadpoolctl import threadpool_limits, threadpool_info
        threadpool_limits(threads, user_api="blas")
        matmul = lambda: a @ b                        # noqa: E731
        blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"
                and "numpy" in lib.get("filepath", "")] or \
               [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
        if blas:
            info["library"] = (f"numpy {np.__version__} @ {blas[0].get('internal_api')} "
                               f"{blas[0].get('version')}, {blas[0].get('num_threads')} threads")

    def step(_):
        t0 = time.perf_counter()
        matmul()
        return time.perf_counter() - t0

    times = time_steps(step, spec["warmup"], spec["reps"])
    t = statistics.median(times)
    return dict(info, times_s=times, median_s=t, gflops=2.0 * n ** 3 / t / 1e9)


def femto_model(cfg, seed=0):
    from femtogpt import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=cfg.get("vocab_size", VOCAB), block_size=cfg["block_size"],
                         n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                         bias=cfg["bias"], gelu=cfg["gelu"], dtype=cfg.get("dtype", "fp32")),
               seed=seed)


def femto_train_step(model, optimizer, cfg, x, y, lr):
    """The arithmetic of femtogpt.train.Run.train_step, without its data loading."""
    from femtogpt.train import grad_norm
    loss = model.loss(x, y)
    model.zero_grad()
    model.backward(accumulate=True)
    norm = grad_norm(model)
    scale = 1.0
    if cfg["grad_clip"] > 0.0 and norm > cfg["grad_clip"]:
        scale = cfg["grad_clip"] / (norm + 1e-6)
    optimizer.step(lr, scale)
    return loss, norm


def femto_optimizer(model, cfg):
    from femtogpt.train import AdamW
    return AdamW(model, cfg["beta1"], cfg["beta2"], weight_decay=cfg["weight_decay"])


def worker_train_femtogpt(spec):
    import numpy as np
    import femtogpt
    femtogpt.set_num_threads(spec["threads"])
    baseline = rss_now_mb()
    cfg = spec["cfg"]
    model = femto_model(cfg, seed=cfg["seed"])
    model.train()
    optimizer = femto_optimizer(model, cfg)
    rng = np.random.default_rng(spec["seed"])

    def step(i):
        x, y = random_batch(rng, cfg)     # outside the timer, as for torch
        t0 = time.perf_counter()
        loss, norm = femto_train_step(model, optimizer, cfg, x, y, spec["lrs"][i])
        dt = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"femtogpt loss {loss}, gradient norm {norm}")
        return dt

    times = time_steps(step, spec["warmup"], spec["reps"])
    n_no_wpe = model.num_parameters() - cfg["block_size"] * cfg["n_embd"]
    return dict(summarise_steps(times, cfg, n_no_wpe, baseline),
                threads=femtogpt.get_num_threads())


def worker_sample_femtogpt(spec):
    import numpy as np
    import femtogpt
    femtogpt.set_num_threads(spec["threads"])
    model = femto_model(spec["cfg"], seed=0)
    model.eval()
    prompt = np.zeros((1, 1), dtype=np.int64)
    model.generate(prompt, 50, temperature=1.0, seed=12345)        # warm-up
    times = []
    for run in range(spec["runs"]):
        t0 = time.perf_counter()
        out = model.generate(prompt, spec["tokens"], temperature=1.0, seed=run)
        times.append(time.perf_counter() - t0)
        assert out.shape == (1, 1 + spec["tokens"])
    t = statistics.median(times)
    return {"times_s": times, "median_s": t, "tokens_per_s": spec["tokens"] / t}


def worker_train_ranks(spec):
    """One rank of `mpiexec -n N bench.py --worker SPEC`: femtogpt's own
    distributed step (Run.train_step: its share of the batch, the allreduce,
    AdamW) on Tiny Shakespeare; rank 0 reports."""
    from dataclasses import replace
    import femtogpt
    from femtogpt.train.distributed import MPIComm
    from femtogpt.train import PRESETS, Run
    comm = MPIComm(timeout=3600)
    cfg = replace(PRESETS[spec["preset"]], out=spec["out"], threads=1, sample_tokens=0)
    run = Run(cfg, log=lambda message: None, comm=comm)
    baseline = rss_now_mb()

    def step(i):
        t0 = time.perf_counter()
        run.train_step()
        return time.perf_counter() - t0

    times = time_steps(step, spec["warmup"], spec["reps"])
    # Every rank's step ends with the same allreduce: rank 0's times are the job's.
    peaks = comm.gather(peak_rss_mb())
    if comm.rank != 0:
        sys.exit(0)
    n_no_wpe = run.model.num_parameters() - cfg.block_size * cfg.n_embd
    bench_cfg = preset_cfg(spec["preset"])
    return dict(summarise_steps(times, bench_cfg, n_no_wpe, baseline), ranks=comm.size,
                threads=femtogpt.get_num_threads(), peak_rss_mb_per_rank=peaks)
