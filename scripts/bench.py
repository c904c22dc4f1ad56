#!/usr/bin/env python
"""Benchmark femtogpt on this machine, optionally against the same model in PyTorch.

    PYTHONPATH=. python scripts/bench.py --quick               # smoke run, ~1 minute
    PYTHONPATH=. python scripts/bench.py                       # femto, baby, small
    PYTHONPATH=. python scripts/bench.py --vs-torch            # also PyTorch (pip install torch==2.13.0)

What is measured, all in one run:
  * sgemm peak: numpy float32 2048x2048 @ 2048x2048, GFLOP/s. It is the yardstick
    for the model-FLOPs utilisation (MFU) of both implementations.
  * one training step (forward, backward, clip by global norm, AdamW) for each
    preset: median ms, tokens/s and MFU (nanoGPT's flops estimate).
  * sampling: the baby model, batch 1, 500 new tokens from a 1-token prompt.
  * peak resident memory (RSS) of training each preset.
  * the speed-up from 1 thread to --threads threads on the largest preset.
  * data-parallel scaling over MPI (when mpi4py and mpiexec are installed,
    pip install '.[mpi]'): the same preset's real distributed training step
    (femtogpt.train.Run with its allreduce) with 1 rank and with --threads
    ranks, one thread each, the global batch unchanged.
  * with --vs-torch: the same model in PyTorch (nanoGPT's code, written out
    compactly below), first checked to compute the same loss from the same
    weights, then timed in alternation with femtogpt.
  * with --vs-nanogpt DIR (a nanoGPT checkout, with torch installed): the
    default run end to end, as a user types it: `femtogpt train` against the
    CPU command of nanoGPT's README, alternated, each a whole process (wall
    time from start to exit, peak RSS, final val loss).

Every (implementation, measurement) runs in its own subprocess
(`bench.py --worker SPEC`, which prints one JSON line), so that peak RSS belongs
to that measurement alone, thread settings cannot leak from one to the next, and
femtogpt's processes never import torch (nor torch's femtogpt).

The machine may be shared and noisy: the figures to quote are the medians and
the ratios, which come from measurements taken in alternation.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

PRESET_NAMES = ("femto", "baby", "small")
# GPT-2 124M's shape (random weights, 50,257 tokens), fine-tuned at batch 4 with
# contexts of 256 and 1,024 tokens: `--presets gpt2-t256,gpt2-t1024`.
GPT2_SHAPES = {"gpt2-t256": 256, "gpt2-t1024": 1024}
BENCH_PRESETS = PRESET_NAMES + tuple(GPT2_SHAPES)
VOCAB = 65                      # Tiny Shakespeare's characters, as in the presets
SGEMM_N = 2048
SAMPLE_TOKENS = 500
SAMPLE_PRESET = "baby"
TORCH_INSTALL_HINT = "pip install torch==2.13.0"

# Timed steps per worker (after warm-up). A small step takes seconds, a femto
# step milliseconds: the rep counts keep each worker to a similar wall time.
REPS = {"femto": 20, "baby": 20, "small": 3, "gpt2-t256": 3, "gpt2-t1024": 2}
WARMUP = {"femto": 3, "baby": 3, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}
QUICK_REPS = {"femto": 5, "baby": 5, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}
QUICK_WARMUP = {"femto": 1, "baby": 1, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}


def log(message):
    # Progress goes to stderr: stdout carries only the final table.
    print(message, file=sys.stderr, flush=True)


# =============================================================================
# Worker side: each function runs in a fresh subprocess and returns a dict
# =============================================================================

def rss_now_mb():
    """Current resident set size (MB), from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Peak RSS of this process so far (MB). ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def flops_per_token(n_params_no_wpe, cfg):
    """nanoGPT's estimate (estimate_mfu): 6N for the matmuls' forward + backward,
    plus 12*L*C*T for attention's score and value products."""
    return 6 * n_params_no_wpe + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]


def random_batch(rng, cfg, batch_size=None):
    # Data content does not change the work done, so uniform random ids will do.
    shape = (batch_size or cfg["batch_size"], cfg["block_size"])
    V = cfg.get("vocab_size", VOCAB)
    return rng.integers(0, V, shape), rng.integers(0, V, shape)


def time_steps(step, n_warmup, n_reps):
    """Run step(i) n_warmup + n_reps times; seconds of each timed call."""
    for i in range(n_warmup):
        step(i)
    times = []
    for i in range(n_warmup, n_warmup + n_reps):
        times.append(step(i))
    return times


def summarise_steps(times, cfg, n_params_no_wpe, baseline_mb):
    t = statistics.median(times)
    return {
        "step_s": times,
        "median_ms": 1e3 * t,
        "tokens_per_s": cfg["batch_size"] * cfg["block_size"] / t,
        "n_params_no_wpe": n_params_no_wpe,
        "flops_per_token": flops_per_token(n_params_no_wpe, cfg),
        "rss_after_imports_mb": baseline_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


# --- sgemm -----------------------------------------------------------------------

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


# --- femtogpt ----------------------------------------------------------------------

def femto_model(cfg, seed=0):
    from femtogpt import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=cfg.get("vocab_size", VOCAB), block_size=cfg["block_size"],
                         n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                         bias=cfg["bias"], gelu=cfg["gelu"]),
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


# --- PyTorch: nanoGPT's model, written out compactly --------------------------------

def torch_gpt_class():
    """nanoGPT's GPT (model.py) as a class, importing torch only when called.

    Same parameter names as nanoGPT and femtogpt's state_dict(), and the same
    two options: cfg["bias"] (nanoGPT's bias) and cfg["gelu"], "exact" for
    nanoGPT's nn.GELU() or "tanh" for GPT-2's approximation.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class CausalSelfAttention(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            C = cfg["n_embd"]
            self.n_head, self.dropout = cfg["n_head"], cfg["dropout"]
            self.c_attn = nn.Linear(C, 3 * C, bias=cfg["bias"])    # q, k, v in this order
            self.c_proj = nn.Linear(C, C, bias=cfg["bias"])
            self.attn_dropout = nn.Dropout(self.dropout)
            self.resid_dropout = nn.Dropout(self.dropout)
            self.flash = hasattr(F, "scaled_dot_product_attention")

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            # (B, T, C) -> (B, nh, T, hs)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in (q, k, v))
            if self.flash:
                # What nanoGPT runs on torch >= 2.0, dropout on the weights included.
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None, is_causal=True,
                    dropout_p=self.dropout if self.training else 0.0)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
                mask = torch.ones(T, T, dtype=torch.bool).tril()
                att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
                y = self.attn_dropout(att) @ v
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            C = cfg["n_embd"]
            self.c_fc = nn.Linear(C, 4 * C, bias=cfg["bias"])
            self.gelu = nn.GELU(approximate="tanh" if cfg["gelu"] == "tanh" else "none")
            self.c_proj = nn.Linear(4 * C, C, bias=cfg["bias"])
            self.dropout = nn.Dropout(cfg["dropout"])

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg["n_embd"], eps=1e-5, bias=cfg["bias"])
            self.attn = CausalSelfAttention(cfg)
            self.ln_2 = nn.LayerNorm(cfg["n_embd"], eps=1e-5, bias=cfg["bias"])
            self.mlp = MLP(cfg)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.block_size = cfg["block_size"]
            C = cfg["n_embd"]
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.get("vocab_size", VOCAB), C),
                wpe=nn.Embedding(cfg["block_size"], C),
                drop=nn.Dropout(cfg["dropout"]),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg["n_layer"])]),
                ln_f=nn.LayerNorm(C, eps=1e-5, bias=cfg["bias"]),
            ))
            self.lm_head = nn.Linear(C, cfg.get("vocab_size", VOCAB), bias=False)
            self.transformer.wte.weight = self.lm_head.weight      # weight tying
            # nanoGPT's init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)).
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    nn.init.ones_(p)
                elif name.endswith("c_proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]))
                else:
                    nn.init.normal_(p, 0.0, 0.02)

        def forward(self, idx, targets=None):
            T = idx.size(1)
            pos = torch.arange(T, dtype=torch.long)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            x = self.transformer.ln_f(x)
            if targets is None:
                # nanoGPT at inference: the head on the last position only
                return self.lm_head(x[:, [-1], :]), None
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        @torch.no_grad()
        def generate(self, idx, max_new_tokens, temperature=1.0):
            # nanoGPT's generate: no KV cache, the whole (cropped) window every token.
            for _ in range(max_new_tokens):
                cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
                logits, _ = self(cond)
                probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
                idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
            return idx

    return TorchGPT


def torch_optimizer(model, cfg):
    """nanoGPT's configure_optimizers: decay on rank >= 2 tensors, PyTorch's defaults
    otherwise (fused/foreach left to torch; eps 1e-8, as femtogpt's AdamW)."""
    import torch
    params = dict(model.named_parameters())       # the tied wte/lm_head counted once
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2],
         "weight_decay": cfg["weight_decay"]},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"],
                             betas=(cfg["beta1"], cfg["beta2"]))


def torch_train_step(model, optimizer, cfg, x, y, lr):
    """nanoGPT's train.py step (no grad accumulation, no AMP on a CPU)."""
    import torch
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.item(), float(norm)


def torch_setup(threads):
    import torch
    torch.set_num_threads(threads)
    return torch


def worker_train_torch(spec):
    import numpy as np
    torch = torch_setup(spec["threads"])
    baseline = rss_now_mb()
    cfg = spec["cfg"]
    torch.manual_seed(cfg["seed"])
    model = torch_gpt_class()(cfg)
    model.train()
    optimizer = torch_optimizer(model, cfg)
    rng = np.random.default_rng(spec["seed"])

    def step(i):
        x, y = (torch.from_numpy(a) for a in random_batch(rng, cfg))
        t0 = time.perf_counter()
        loss, norm = torch_train_step(model, optimizer, cfg, x, y, spec["lrs"][i])
        dt = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"torch loss {loss}, gradient norm {norm}")
        return dt

    times = time_steps(step, spec["warmup"], spec["reps"])
    n_params = sum(p.numel() for p in model.parameters())      # tied weight once
    n_no_wpe = n_params - model.transformer.wpe.weight.numel()
    return dict(summarise_steps(times, cfg, n_no_wpe, baseline),
                threads=torch.get_num_threads(), torch=torch.__version__)


def worker_sample_torch(spec):
    torch = torch_setup(spec["threads"])
    model = torch_gpt_class()(spec["cfg"])
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)
    torch.manual_seed(12345)
    model.generate(prompt, 50, temperature=1.0)                 # warm-up
    times = []
    for run in range(spec["runs"]):
        torch.manual_seed(run)
        t0 = time.perf_counter()
        out = model.generate(prompt, spec["tokens"], temperature=1.0)
        times.append(time.perf_counter() - t0)
        assert tuple(out.shape) == (1, 1 + spec["tokens"])
    t = statistics.median(times)
    return {"times_s": times, "median_s": t, "tokens_per_s": spec["tokens"] / t}


# --- numerics: is it the same model? -------------------------------------------------

def spread_weights(state, seed):
    """Weights of order one: N(0, 1/fan_in) matrices, perturbed LayerNorms, nonzero biases.

    At nanoGPT's init every logit is ~0 and the loss is ~ln(65) whatever the
    architecture, so a matching loss there proves little. With these weights
    the attention patterns, LayerNorms, biases and the GELU all move the loss.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in state.items():
        if value.ndim >= 2:
            gain = 2.0 if name == "transformer.wte.weight" else 1.0    # wider logits
            out[name] = (rng.standard_normal(value.shape) * gain
                         / math.sqrt(value.shape[-1])).astype(np.float32)
        elif ".ln_" in name and name.endswith("weight"):
            out[name] = (1.0 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
        else:
            out[name] = (0.2 * rng.standard_normal(value.shape)).astype(np.float32)
    return out


def worker_check(spec):
    """Same weights and batch into both models: loss, gradients, one AdamW step.

    Dropout is off (eval mode) on both sides: the two draw different masks, so
    with dropout on only the distributions, not the numbers, could agree.
    """
    import numpy as np
    import femtogpt
    torch = torch_setup(spec["threads"])
    femtogpt.set_num_threads(spec["threads"])
    cfg = spec["cfg"]
    rng = np.random.default_rng(spec["seed"])
    x, y = random_batch(rng, cfg, batch_size=spec["batch_size"])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    result = {"batch_size": spec["batch_size"]}

    for weights in ("init", "spread"):
        fm = femto_model(cfg, seed=cfg["seed"])
        if weights == "spread":
            fm.load_state_dict(spread_weights(fm.state_dict(), spec["seed"]))
        fm.eval()
        tm = torch_gpt_class()(cfg)
        state = {k: torch.from_numpy(v) for k, v in fm.state_dict().items()}
        state["lm_head.weight"] = state["transformer.wte.weight"]    # tied
        tm.load_state_dict(state, strict=True)
        tm.eval()

        # forward + backward
        loss_f = fm.loss(x, y)
        grads_f = fm.backward()
        _, loss_t = tm(xt, yt)
        loss_t.backward()
        grads_t = {n: p.grad.numpy() for n, p in tm.named_parameters()}
        grad_err = max(float(np.linalg.norm(grads_f[n] - grads_t[n])
                             / max(np.linalg.norm(grads_t[n]), 1e-30)) for n in grads_f)

        # one optimizer step each at the peak learning rate, clipping included
        lr = cfg["learning_rate"]
        opt_f = femto_optimizer(fm, cfg)
        from femtogpt.train import grad_norm
        norm_f = grad_norm(fm)
        scale = cfg["grad_clip"] / (norm_f + 1e-6) if norm_f > cfg["grad_clip"] else 1.0
        opt_f.step(lr, scale)
        opt_t = torch_optimizer(tm, cfg)
        norm_t = float(torch.nn.utils.clip_grad_norm_(tm.parameters(), cfg["grad_clip"]))
        opt_t.step()
        params_f = fm.state_dict()
        tparams = {n: p.detach().numpy() for n, p in tm.named_parameters()}
        step_err = max(float(np.max(np.abs(params_f[n] - tparams[n]))) for n in params_f)
        after_f = fm.loss(x, y)
        with torch.no_grad():
            after_t = float(tm(xt, yt)[1])

        result[weights] = {
            "loss_femtogpt": float(loss_f), "loss_torch": float(loss_t),
            "loss_abs_diff": abs(float(loss_f) - float(loss_t)),
            "grad_norm_femtogpt": norm_f, "grad_norm_torch": norm_t,
            "max_grad_rel_err": grad_err,
            "max_param_diff_after_step_in_lr": step_err / lr,
            "loss_after_step_femtogpt": float(after_f), "loss_after_step_torch": after_t,
            "loss_after_step_abs_diff": abs(float(after_f) - after_t),
        }
    result["ok"] = all(result[w]["loss_abs_diff"] < 1e-4 and
                       result[w]["loss_after_step_abs_diff"] < 1e-4
                       for w in ("init", "spread"))
    return result


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


WORKERS = {
    ("sgemm", "numpy"): worker_sgemm, ("sgemm", "torch"): worker_sgemm,
    ("train", "femtogpt"): worker_train_femtogpt, ("train", "torch"): worker_train_torch,
    ("sample", "femtogpt"): worker_sample_femtogpt, ("sample", "torch"): worker_sample_torch,
    ("check", "torch"): worker_check,
    ("ranks", "femtogpt"): worker_train_ranks,
}


def worker_main(spec_json):
    spec = json.loads(spec_json)
    result = WORKERS[(spec["task"], spec["impl"])](spec)
    # One JSON line, the last line of stdout: what the parent reads.
    print(json.dumps(result), flush=True)


# =============================================================================
# Parent side: runs the workers in alternation and reports
# =============================================================================

def find_mpiexec():
    """mpiexec next to this python (the mpich wheel's) or on PATH, if mpi4py is
    installed too; else None."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    for folder in [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "mpiexec")
        if os.access(path, os.X_OK):
            return path
    return None


def run_worker(spec, launcher=()):
    """Run one measurement in a fresh interpreter; its result dict, or {"error": ...}."""
    env = dict(os.environ)
    # Every thread pool a worker may touch gets the same count: femtogpt's
    # OpenMP, torch's OpenMP/MKL, numpy's OpenBLAS.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(spec["threads"])
    cmd = [*launcher, sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        log(f"  worker {spec['task']}/{spec['impl']} failed (exit {proc.returncode}):\n{tail}")
        return {"error": f"exit {proc.returncode}: {tail[-500:]}"}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def median_of(results, key):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def preset_cfg(name):
    """The preset's model and optimiser settings as plain data for the workers,
    so that torch workers need not import femtogpt."""
    from femtogpt.train import PRESETS
    if name in GPT2_SHAPES:
        return {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": GPT2_SHAPES[name],
                "batch_size": 4, "dropout": 0.0, "bias": True, "gelu": "tanh",
                "learning_rate": 3e-5, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1,
                "grad_clip": 1.0, "seed": 1337, "vocab_size": 50257}
    p = PRESETS[name]
    keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "bias",
            "gelu", "learning_rate", "beta1", "beta2", "weight_decay", "grad_clip", "seed")
    return {k: getattr(p, k) for k in keys}


def schedule(name, n_steps):
    """femtogpt's learning rates for the first n_steps iterations (get_lr)."""
    from femtogpt.train import PRESETS, get_lr
    if name in GPT2_SHAPES:
        return [3e-5] * n_steps      # fine-tuning: constant
    return [get_lr(it, PRESETS[name]) for it in range(n_steps)]


def machine_info():
    import numpy
    import scipy
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch_version = None
    if importlib.util.find_spec("torch") is not None:
        from importlib.metadata import version, PackageNotFoundError
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": cpu or platform.processor(),
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": numpy.__version__, "scipy": scipy.__version__, "torch": torch_version,
        "loadavg_start": os.getloadavg(),
    }


def fmt(value, spec, missing="—"):
    return missing if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(x):
    return "—" if x is None else f"{x:.2f}×"


def build_table(res, args):
    """The Markdown report: one row per piece of work, femtogpt | PyTorch | ratio."""
    vs = args.vs_torch
    th = args.threads
    rows = []

    def row(work, f, t, r):
        rows.append(f"| {work} | {f} | {t if vs else '—'} | {r if vs else '—'} |")

    sg = res["sgemm"]
    row(f"sgemm peak, {SGEMM_N}³ float32, {th} threads (GFLOP/s; ratio numpy ÷ torch.mm)",
        f"{fmt(sg['numpy'], '.1f')} (numpy)", f"{fmt(sg.get('torch'), '.1f')} (torch.mm)",
        fmt(ratio(sg["numpy"], sg.get("torch")), ".2f"))
    for name, tr in res["train"].items():
        cells = {}
        for impl in ("femtogpt", "torch"):
            m = tr.get(impl)
            if not m or m.get("median_ms") is None:
                cells[impl] = "failed" if m else "—"
                continue
            cells[impl] = (f"{m['median_ms']:,.1f} ms, {m['tokens_per_s']:,.0f} tok/s, "
                           f"MFU {fmt(m['mfu'] and 100 * m['mfu'], '.1f')}%")
        c = tr["cfg"]
        row(f"train step {name} (B={c['batch_size']}, T={c['block_size']}, L={c['n_layer']}, "
            f"C={c['n_embd']}, dropout {c['dropout']:g})", cells["femtogpt"], cells["torch"],
            times(tr.get("speed_ratio")))
    sm = res["sample"]
    row(f"sampling {SAMPLE_PRESET}, batch 1, {SAMPLE_TOKENS} tokens (tok/s)",
        fmt(sm.get("femtogpt"), ",.0f") + " (KV cache)",
        fmt(sm.get("torch"), ",.0f") + " (nanoGPT: no cache)",
        times(ratio(sm.get("femtogpt"), sm.get("torch"))))
    for name, tr in res["train"].items():
        f, t = tr.get("femtogpt", {}), tr.get("torch", {})
        row(f"peak RSS training {name} (MB; above imports)",
            f"{fmt(f.get('peak_rss_mb'), ',.0f')} ({fmt(f.get('rss_above_imports_mb'), ',.0f')})",
            f"{fmt(t.get('peak_rss_mb'), ',.0f')} ({fmt(t.get('rss_above_imports_mb'), ',.0f')})",
            fmt(ratio(f.get("peak_rss_mb"), t.get("peak_rss_mb")), ".2f"))
    sc = res.get("scaling")
    if sc:
        row(f"{sc['preset']}: 1 → {th} threads speed-up",
            times(sc.get("femtogpt")), times(sc.get("torch")), "—")
    rk = res.get("ranks")
    if rk and not rk.get("skipped"):
        row(f"{rk['preset']}: 1 → {rk['ranks']} MPI ranks × 1 thread speed-up "
            f"({fmt(rk['one_rank_ms'], ',.0f')} → {fmt(rk['many_ranks_ms'], ',.0f')} ms/step)",
            times(rk.get("speedup")), "—", "—")
    ee = res.get("end_to_end")
    if ee:
        f, n = ee["femtogpt"], ee["nanogpt"]
        rows.append(f"| the default run end to end (wall s; val loss at step 2000) | "
                    f"{fmt(f['wall_s'], '.1f')} s; {fmt(f['val_loss'], '.4f')} | "
                    f"{fmt(n['wall_s'], '.1f')} s; {fmt(n['val_loss'], '.4f')} (nanoGPT) | "
                    f"{times(ratio(n['wall_s'], f['wall_s']))} |")
        rows.append(f"| peak RSS of the default run (MB) | {fmt(f['peak_rss_mb'], ',.0f')} | "
                    f"{fmt(n['peak_rss_mb'], ',.0f')} (nanoGPT) | "
                    f"{fmt(ratio(f['peak_rss_mb'], n['peak_rss_mb']), '.2f')} |")
    tk = res.get("tokenizer")
    if tk:
        rows.append(f"| GPT-2 tokenizer ({tk['vocab']:,} tokens) encoding Tiny Shakespeare x10 "
                    f"({tk['mb']:.1f} MB), MB/s, 1 thread ({th} threads) | "
                    f"{fmt(tk['femtogpt_1'], '.1f')} ({fmt(tk['femtogpt_all'], '.1f')}) | "
                    f"{fmt(tk['tokenizers_1'], '.1f')} (tokenizers, 1 thread) | "
                    f"{times(ratio(tk['femtogpt_1'], tk['tokenizers_1']))}; same ids: "
                    f"{'yes' if tk['same_ids'] else 'NO'} |")
    ck = res.get("check")
    if ck:
        for name, c in ck.items():
            if "error" in c:
                row(f"numerics {name}", "check failed to run", "", "")
                continue
            s = c["spread"]
            # No "|" inside a cell: it would split the Markdown table.
            row(f"numerics {name}: loss on the same O(1) weights and batch (B={c['batch_size']})",
                f"{s['loss_femtogpt']:.6f}", f"{s['loss_torch']:.6f}",
                f"Δloss {s['loss_abs_diff']:.1e}, Δgrad {s['max_grad_rel_err']:.1e} (rel): "
                f"{'OK' if c['ok'] else 'MISMATCH'}")

    m = res["machine"]
    steps = ", ".join(f"{p} {res['reps'][p]} steps" for p in res["train"])
    lines = [
        f"## femtogpt benchmark: {m['cpu_model']}, {m['nproc']} cores, {th} threads",
        "",
        "| work | femtogpt | PyTorch | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ratios are femtogpt ÷ PyTorch: above 1 femtogpt is faster (speed) or uses "
        f"more memory (RSS)." if vs else "PyTorch not measured (add --vs-torch).",
        f"Each figure is the median over {args.rounds} round(s) of each worker's median "
        f"(training: {steps} after warm-up); femtogpt and PyTorch ran alternately in "
        f"separate processes. "
        f"The machine may be shared and noisy (load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end): "
        f"quote the medians and the ratios, not single runs.",
        "MFU = (6·N + 12·L·C·T) flops per token × tokens/s ÷ the sgemm peak above "
        "(nanoGPT's estimate; N excludes the position embedding); both columns use the "
        "numpy peak.",
        "Sampling: femtogpt uses its KV cache; nanoGPT's generate recomputes the "
        "whole window for every token, so that ratio compares methods, not kernels.",
    ]
    if ck:
        done = [c for c in ck.values() if "error" not in c]
        worst = lambda key: max((c[w][key] for c in done for w in ("init", "spread")),
                                default=float("nan"))           # noqa: E731
        lines.append(
            "Numerics, checked before timing with dropout off, at nanoGPT's init and at O(1) "
            f"random weights: worst loss difference {worst('loss_abs_diff'):.1e} (tolerance "
            f"1e-4), worst relative gradient error {worst('max_grad_rel_err'):.1e}, after one "
            f"AdamW step (lr 1e-3, clipping) worst parameter difference "
            f"{worst('max_param_diff_after_step_in_lr'):.1e}·lr and loss difference "
            f"{worst('loss_after_step_abs_diff'):.1e}.")
    if vs:
        lines.append("The PyTorch model is nanoGPT's, with each preset's biases and GELU "
                     "form (femto: biases, tanh; baby and small: nanoGPT's bias=False and "
                     "exact GELU); attention is "
                     "F.scaled_dot_product_attention(is_causal=True).")
    if ee:
        lines.append(
            f"End to end: `femtogpt train` (its default: the baby preset) and nanoGPT's "
            f"README CPU command (`{' '.join(NANOGPT_CPU_ARGS)}`), each a whole process from "
            f"start to exit, alternated over {len(ee['femtogpt']['runs'])} round(s); the "
            f"ratio is nanoGPT's wall time ÷ femtogpt's (above 1: femtogpt is faster).")
    lines += ["", f"Machine: {m['platform']}, Python {m['python']}, numpy {m['numpy']}, "
              f"scipy {m['scipy']}, torch {m['torch'] or 'not installed'}.",
              f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def measure_ranks(args, th, R, reps, warmup):
    import tempfile
    name = args.presets[-1] if "small" not in args.presets else "small"
    mpiexec = find_mpiexec()
    if mpiexec is None:
        log("MPI scaling skipped: mpi4py or mpiexec not installed (pip install '.[mpi]')")
        return {"preset": name, "skipped": "mpi4py or mpiexec not installed"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(R):
            for n in (1, th):
                log(f"train {name}, {n} MPI rank(s) x 1 thread, round {r + 1}/{R}")
                spec = {"task": "ranks", "impl": "femtogpt", "threads": 1, "preset": name,
                        "out": os.path.join(tmp, f"ranks{n}-{r}"),
                        "warmup": warmup[name], "reps": reps[name]}
                result = run_worker(spec, launcher=(mpiexec, "-n", str(n)))
                out.setdefault(n, []).append(result)
                if "median_ms" in result:
                    log(f"  {result['median_ms']:,.1f} ms/step ({result['wall_s']:.0f} s)")
    one, many = median_of(out[1], "median_ms"), median_of(out[th], "median_ms")
    return {"preset": name, "ranks": th, "one_rank_ms": one, "many_ranks_ms": many,
            "speedup": ratio(one, many), "runs": {str(k): v for k, v in out.items()}}


# --- end to end: the default run against nanoGPT's ------------------------------------

# nanoGPT's README, "I only have a macbook" (its CPU recipe, the baby GPT).
NANOGPT_CPU_ARGS = ["train.py", "config/train_shakespeare_char.py", "--device=cpu",
                    "--compile=False", "--eval_iters=20", "--log_interval=1",
                    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
                    "--dropout=0.0"]
# nanoGPT seeds torch with 1337 (+ a DDP rank offset) and has no option for it:
# this shim shifts the seed it asks for, so seed 1337 is nanoGPT unchanged.
NANOGPT_SEED_SHIM = ("import runpy, sys, torch; seed = int(sys.argv.pop(1)); "
                     "sys.argv = sys.argv[1:]; "
                     "real = torch.manual_seed; "
                     "torch.manual_seed = lambda s: real(s - 1337 + seed); "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def nanogpt_problem(folder):
    """Why folder cannot run nanoGPT's CPU recipe, or None."""
    if not os.path.isfile(os.path.join(folder, "train.py")):
        return f"{folder} is not a nanoGPT checkout (no train.py)"
    data = os.path.join(folder, "data", "shakespeare_char")
    if not os.path.isfile(os.path.join(data, "train.bin")):
        return (f"{data}/train.bin is missing: copy Tiny Shakespeare to {data}/input.txt "
                f"(femtogpt ships it: femtogpt/data/tinyshakespeare.txt) and run "
                f"`python prepare.py` there")
    return None


def timed_process(cmd, cwd=None, env=None):
    """Run cmd to its end: (exit status, stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def run_femtogpt_default(seed, out, threads):
    """`femtogpt train` with only --out (and --seed, unless it is the default)."""
    cmd = [sys.executable, "-m", "femtogpt.app.cli", "train", "--out", out, "--no-progress"]
    if seed != 1337:
        cmd += ["--seed", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code, stdout, stderr, wall = timed_process(cmd, env=env)
    if code != 0:
        return {"error": f"exit {code}: {stderr[-500:]}"}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = rows[-1]
    return {"wall_s": wall, "val_loss": last["val_loss"], "iter": last["iter"],
            "best_val_loss": min(r["val_loss"] for r in rows)}


def run_nanogpt(folder, seed, out, threads):
    """nanoGPT's README CPU command with torch seeded by `seed` (1337: unchanged)."""
    cmd = [sys.executable, "-c", NANOGPT_SEED_SHIM, str(seed), *NANOGPT_CPU_ARGS,
           f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code, stdout, stderr, wall = timed_process(cmd, cwd=folder, env=env)
    if code != 0:
        return {"error": f"exit {code}: {stderr[-500:]}"}
    evals = [line for line in stdout.splitlines() if line.startswith("step ")]
    # "step 2000: train loss 1.7663, val loss 1.8857"
    last = evals[-1]
    losses = [float(line.rsplit("val loss", 1)[1]) for line in evals]
    return {"wall_s": wall, "val_loss": losses[-1], "iter": int(last.split()[1].rstrip(":")),
            "best_val_loss": min(losses)}


def peak_rss_of(function, *args):
    """function(*args) in a forked child, so that RUSAGE_CHILDREN's peak is its own."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(_with_child_peak, (function, *args))


def _with_child_peak(function, *args):
    result = function(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return result


def measure_end_to_end(nanogpt_dir, rounds, threads):
    import tempfile
    runs = {"femtogpt": [], "nanogpt": []}
    with tempfile.TemporaryDirectory(prefix="femtogpt-e2e-") as tmp:
        for r in range(rounds):
            for impl in ("femtogpt", "nanogpt"):
                out = os.path.join(tmp, f"{impl}-{r}")
                log(f"end to end: {impl}, round {r + 1}/{rounds} (about two minutes)")
                if impl == "femtogpt":
                    result = peak_rss_of(run_femtogpt_default, 1337, out, threads)
                else:
                    result = peak_rss_of(run_nanogpt, nanogpt_dir, 1337, out, threads)
                runs[impl].append(result)
                if "error" in result:
                    log(f"  failed: {result['error']}")
                else:
                    log(f"  {result['wall_s']:.1f} s, val loss {result['val_loss']:.4f}, "
                        f"peak RSS {result['peak_rss_mb']:,.0f} MB")
    return {impl: {"wall_s": median_of(rs, "wall_s"), "val_loss": median_of(rs, "val_loss"),
                   "peak_rss_mb": median_of(rs, "peak_rss_mb"), "runs": rs}
            for impl, rs in runs.items()}


def parse_args(argv):
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, nproc),
                    help="threads for both implementations (default: 2, or nproc if fewer)")
    ap.add_argument("--presets", default=",".join(PRESET_NAMES),
                    help="comma-separated presets to train (default: femto,baby,small)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds per measurement (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer repetitions, one round, no small preset")
    ap.add_argument("--vs-torch", action="store_true",
                    help=f"also run the same model in PyTorch ({TORCH_INSTALL_HINT})")
    ap.add_argument("--vs-nanogpt", metavar="DIR", default=None,
                    help="also time the default run end to end against nanoGPT's README CPU "
                         "command, in this nanoGPT checkout (needs torch)")
    ap.add_argument("--no-scaling", action="store_true",
                    help="skip the 1-thread and MPI-rank runs behind the speed-up rows")
    ap.add_argument("--markdown", default="bench.md", help="Markdown report (default bench.md)")
    ap.add_argument("--json", default="bench.json", help="every number (default bench.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)    # internal: one measurement
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be >= 1")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in BENCH_PRESETS]
    if unknown or not presets:
        ap.error(f"unknown preset(s) {unknown}; choose from {', '.join(BENCH_PRESETS)}")
    if args.quick:
        presets = [p for p in presets if p != "small"]     # a small step takes seconds
        if not presets:
            ap.error("--quick skips the small preset: give another one in --presets")
    args.presets = presets
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.vs_nanogpt:
        problem = nanogpt_problem(args.vs_nanogpt)
        if problem:
            sys.exit(f"--vs-nanogpt: {problem}")
    if (args.vs_torch or args.vs_nanogpt) and importlib.util.find_spec("torch") is None:
        sys.exit(f"--vs-torch needs PyTorch, which is not installed in {sys.executable}.\n"
                 f"Install the CPU build with:  {TORCH_INSTALL_HINT}\n"
                 f"(e.g. pip install torch==2.13.0 --index-url "
                 f"https://download.pytorch.org/whl/cpu)")
    try:
        import femtogpt  # noqa: F401  (fail early, with the reason, before any worker)
    except ImportError as err:
        sys.exit(f"cannot import femtogpt ({err}): pip install . or set PYTHONPATH "
                 f"to the repository")

    th, R, quick = args.threads, args.rounds, args.quick
    reps = QUICK_REPS if quick else REPS
    warmup = QUICK_WARMUP if quick else WARMUP
    impls = ["femtogpt", "torch"] if args.vs_torch else ["femtogpt"]
    res = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(), "threads": th, "rounds": R, "quick": quick,
        "presets": args.presets, "reps": {p: reps[p] for p in args.presets},
        "warmup": {p: warmup[p] for p in args.presets},
    }
    started = time.perf_counter()

    # 1. Is it the same model? Checked once, before any timing.
    if args.vs_torch:
        res["check"] = {}
        for name in args.presets:
            cfg = preset_cfg(name)
            log(f"numerics check {name}: femtogpt vs torch on the same weights and batch")
            c = run_worker({"task": "check", "impl": "torch", "threads": th, "cfg": cfg,
                            "seed": 7, "batch_size": min(cfg["batch_size"], 16)})
            res["check"][name] = c
            for w in ("init", "spread"):
                if w in c:
                    d = c[w]
                    log(f"  {w:6s} weights: loss femtogpt {d['loss_femtogpt']:.6f} torch "
                        f"{d['loss_torch']:.6f} |diff| {d['loss_abs_diff']:.2e}; grad max rel "
                        f"err {d['max_grad_rel_err']:.1e}; after one AdamW step: max param "
                        f"diff {d['max_param_diff_after_step_in_lr']:.2e} lr, loss |diff| "
                        f"{d['loss_after_step_abs_diff']:.2e}")
            if "ok" in c and not c["ok"]:
                log("  MISMATCH: the two models do not compute the same loss")

    # 2. sgemm peak: numpy is the yardstick; torch.mm alongside for information.
    log(f"sgemm {SGEMM_N}³ float32, {th} threads")
    runs = {"numpy": [], "torch": []}
    for _ in range(R):
        for impl in (["numpy", "torch"] if args.vs_torch else ["numpy"]):
            runs[impl].append(run_worker({"task": "sgemm", "impl": impl, "threads": th,
                                          "warmup": 1 if quick else 2,
                                          "reps": 3 if quick else 10}))
    res["sgemm"] = {impl: median_of(r, "gflops") for impl, r in runs.items() if r}
    res["sgemm_runs"] = runs
    peak = res["sgemm"]["numpy"]
    log(f"  numpy {fmt(peak, '.1f')} GFLOP/s"
        + (f", torch.mm {fmt(res['sgemm'].get('torch'), '.1f')} GFLOP/s" if args.vs_torch else ""))

    # 3. Training steps, the two implementations alternating round by round.
    def train_runs(name, threads):
        cfg = preset_cfg(name)
        spec = {"task": "train", "threads": threads, "cfg": cfg, "seed": 1,
                "warmup": warmup[name], "reps": reps[name],
                "lrs": schedule(name, warmup[name] + reps[name])}
        out = {impl: [] for impl in impls}
        for r in range(R):
            for impl in impls:
                log(f"train {name} {impl}, {threads} thread(s), round {r + 1}/{R}")
                out[impl].append(run_worker(dict(spec, impl=impl)))
                ms = out[impl][-1].get("median_ms")
                if ms is not None:
                    log(f"  {ms:,.1f} ms/step, peak RSS {out[impl][-1]['peak_rss_mb']:,.0f} MB "
                        f"({out[impl][-1]['wall_s']:.0f} s)")
        return cfg, out

    res["train"] = {}
    for name in args.presets:
        cfg, out = train_runs(name, th)
        entry = {"cfg": cfg, "runs": out}
        for impl, results in out.items():
            ms = median_of(results, "median_ms")
            if ms is None:
                entry[impl] = {"error": "all runs failed"}
                continue
            fpt = median_of(results, "flops_per_token")
            tps = cfg["batch_size"] * cfg["block_size"] / (ms / 1e3)
            peak_rss = median_of(results, "peak_rss_mb")
            base = median_of(results, "rss_after_imports_mb")
            entry[impl] = {
                "median_ms": ms, "tokens_per_s": tps, "flops_per_token": fpt,
                "n_params_no_wpe": median_of(results, "n_params_no_wpe"),
                "mfu": ratio(fpt * tps, peak * 1e9) if peak else None,
                "peak_rss_mb": peak_rss, "rss_after_imports_mb": base,
                "rss_above_imports_mb": None if base is None else peak_rss - base,
            }
        if args.vs_torch:
            entry["speed_ratio"] = ratio(entry["femtogpt"].get("tokens_per_s"),
                                         entry["torch"].get("tokens_per_s"))
            entry["memory_ratio"] = ratio(entry["femtogpt"].get("peak_rss_mb"),
                                          entry["torch"].get("peak_rss_mb"))
        res["train"][name] = entry

    # 4. Thread scaling on the largest preset measured: its 1-thread step time
    # over the step time at --threads (measured above).
    if th > 1 and not args.no_scaling:
        name = args.presets[-1] if "small" not in args.presets else "small"
        cfg, out = train_runs(name, 1)
        sc = {"preset": name, "runs_1_thread": out}
        for impl in impls:
            one = median_of(out[impl], "median_ms")
            many = res["train"][name].get(impl, {}).get("median_ms")
            sc[impl] = ratio(one, many)
            sc[f"{impl}_1_thread_ms"] = one
        res["scaling"] = sc

    # 5. Data-parallel scaling over MPI: 1 rank, then th ranks, 1 thread each.
    if th > 1 and not args.no_scaling:
        res["ranks"] = measure_ranks(args, th, R, reps, warmup)

    # 6. Sampling: the baby model, batch 1, from a 1-token prompt.
    sample = {"cfg": preset_cfg(SAMPLE_PRESET), "runs": {impl: [] for impl in impls}}
    for r in range(R):
        for impl in impls:
            log(f"sampling {SAMPLE_PRESET} {impl}, {SAMPLE_TOKENS} tokens, round {r + 1}/{R}")
            sample["runs"][impl].append(run_worker({
                "task": "sample", "impl": impl, "threads": th, "cfg": sample["cfg"],
                "tokens": SAMPLE_TOKENS, "runs": 2 if quick else 3}))
    for impl in impls:
        sample[impl] = median_of(sample["runs"][impl], "tokens_per_s")
    res["sample"] = sample

    # 7. End to end: the default run against nanoGPT's, whole processes alternated.
    if args.vs_nanogpt:
        res["end_to_end"] = measure_end_to_end(args.vs_nanogpt, R, th)

    # 8. The GPT-2 tokenizer's encoding speed, one thread and all, beside the
    # tokenizers library's (which also builds the vocabulary: no download).
    if importlib.util.find_spec("tokenizers") is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpt2_probe import tokenizer_speed
        runs = [[tokenizer_speed(8000, threads=t) for t in (1, th)] for _ in range(R)]
        res["tokenizer"] = {
            "vocab": runs[0][0]["vocab"], "mb": runs[0][0]["mb"],
            "same_ids": all(r["same_ids"] for pair in runs for r in pair),
            "femtogpt_1": statistics.median(p[0]["femtogpt_mb_s"] for p in runs),
            "femtogpt_all": statistics.median(p[1]["femtogpt_mb_s"] for p in runs),
            "tokenizers_1": statistics.median(p[0]["tokenizers_mb_s"] for p in runs)}
    else:
        log("GPT-2 tokenizer speed skipped: pip install tokenizers (it builds the vocabulary "
            "to compare against)")

    res["machine"]["loadavg_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - started
    table = build_table(res, args)
    print(table)
    with open(args.markdown, "w") as f:
        f.write(table)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {args.markdown} and {args.json} ({res['elapsed_s']:.0f} s)")
    # A failed equivalence check makes the comparison meaningless: say so in the status.
    if args.vs_torch and not all(c.get("ok") for c in res["check"].values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
