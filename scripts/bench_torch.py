"""scripts/bench.py's PyTorch side: nanoGPT's model written out compactly, its
training step and sampling workers, and the check that it computes the same
loss and gradients as femtogpt from the same weights. Imported only by the
workers that need torch (femtogpt never imports it)."""
import math
import statistics
import time

from bench_common import VOCAB, random_batch, rss_now_mb, summarise_steps, time_steps
from bench_femtogpt import femto_model, femto_optimizer


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
        # --dtype bf16: PyTorch's CPU mixed precision, as a user would turn it on
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.get("dtype") == "bf16"):
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
