"""A float64 numpy reference for femtogpt's GPT: forward and backward.

This file is deliberately independent of the `femtogpt` package: the compiled
kernels are tested against it, so it must not share code with them. It follows
nanoGPT's GPT exactly (pre-LayerNorm blocks, weight tying between the token
embedding and the output head), minus dropout, in both of nanoGPT's variants:
with or without biases (a params dict without '.bias' entries has none) and
with the tanh GELU (GPT-2's) or the exact one (nanoGPT's nn.GELU()).

Conventions used everywhere below:
  B batch, T time (sequence length), C channels (n_embd), H heads,
  hs = C // H head size, V vocabulary size.
  Weights use PyTorch's nn.Linear layout: w is (out, in) and y = x @ w.T + b.
  Every backward function *returns* fresh gradients; nothing is accumulated
  in place. `dout` is always the gradient of some scalar loss with respect to
  the forward function's output (same shape as that output).
"""
import math
import re

import numpy as np
from scipy.special import ndtr     # the standard normal CDF, accurate in both tails

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------
# Embedding: out[b, t] = wte[idx[b, t]] + wpe[t]
# --------------------------------------------------------------------------

def embedding_forward(idx, wte, wpe):
    """idx (B, T) int, wte (V, C), wpe (block_size, C) -> out (B, T, C)."""
    idx = np.asarray(idx)
    wte, wpe = _f64(wte), _f64(wpe)
    T = idx.shape[1]
    if T > wpe.shape[0]:
        raise ValueError(f"sequence length {T} exceeds block_size {wpe.shape[0]}")
    return wte[idx] + wpe[:T]


def embedding_backward(dout, idx, V, block_size):
    """dout (B, T, C) -> (dwte (V, C), dwpe (block_size, C)).

    A token that appears several times receives the sum of its gradients;
    positions >= T receive zero.
    """
    dout = _f64(dout)
    idx = np.asarray(idx)
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # handles repeats
    dwpe = np.zeros((block_size, C))
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# --------------------------------------------------------------------------
# LayerNorm over the last axis
# --------------------------------------------------------------------------

def layernorm_forward(x, w, b=None):
    """x (..., C), w (C,), b (C,) or None -> (out (..., C), cache).

    cache is a dict:
      'x'    the input (..., C)
      'w'    the weight (C,)
      'mean' per-row mean, shape x.shape[:-1]
      'rstd' per-row 1 / sqrt(var + 1e-5), shape x.shape[:-1]
             (var is the biased variance: mean of squared deviations)
    """
    x, w = _f64(x), _f64(w)
    mean = x.mean(axis=-1)
    var = ((x - mean[..., None]) ** 2).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = (x - mean[..., None]) * rstd[..., None]
    out = xhat * w if b is None else xhat * w + _f64(b)
    return out, {"x": x, "w": w, "mean": mean, "rstd": rstd}


def layernorm_backward(dout, cache):
    """dout (..., C) -> (dx (..., C), dw (C,), db (C,)); db is returned even
    when the forward had no bias (the caller ignores it)."""
    dout = _f64(dout)
    x, w, mean, rstd = cache["x"], cache["w"], cache["mean"], cache["rstd"]
    xhat = (x - mean[..., None]) * rstd[..., None]
    C = x.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    # out = xhat * w + b, so dL/dxhat = dout * w. xhat depends on every entry
    # of its row through mean and rstd; differentiating
    # xhat_i = (x_i - mean) * rstd gives the standard result
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    dxhat = dout * w
    dx = rstd[..., None] * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    return dx, dw, db


# --------------------------------------------------------------------------
# Linear: out = x @ w.T + b
# --------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (..., in), w (out, in), b (out,) or None -> out (..., out)."""
    out = _f64(x) @ _f64(w).T
    if b is not None:
        out = out + _f64(b)
    return out


def linear_backward(dout, x, w):
    """dout (..., out), x (..., in), w (out, in)
    -> (dx (..., in), dw (out, in), db (out,)).

    db is returned even when the forward had no bias (the caller ignores it).
    """
    dout, x, w = _f64(dout), _f64(x), _f64(w)
    dout2 = dout.reshape(-1, w.shape[0])  # (N, out)
    x2 = x.reshape(-1, w.shape[1])        # (N, in)
    dx = dout @ w
    dw = dout2.T @ x2
    db = dout2.sum(axis=0)
    return dx, dw, db


# --------------------------------------------------------------------------
# Causal multi-head self-attention (the part between c_attn and c_proj)
# --------------------------------------------------------------------------

def _split_heads(a, n_head):
    """(B, T, C) -> (B, H, T, hs); head h takes columns h*hs:(h+1)*hs."""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(B, H, T, hs) -> (B, T, C); the inverse of _split_heads."""
    B, H, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def attention_forward(qkv, n_head):
    """qkv (B, T, 3C) -> (out (B, T, C), att (B, H, T, T)).

    qkv holds q, k, v side by side (in that order, each C wide). att holds
    the softmax probabilities: att[b, h, t, s] is how much position t attends
    to position s; it is exactly 0 for s > t (causal mask).
    """
    qkv = _f64(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    if C3 != 3 * C or C % n_head != 0:
        raise ValueError(f"bad qkv width {C3} for n_head={n_head}")
    hs = C // n_head
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)      # (B, H, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)        # s > t
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)     # stable softmax
    e = np.exp(scores)                                        # exp(-inf) = 0
    att = e / e.sum(axis=-1, keepdims=True)
    y = att @ v                                               # (B, H, T, hs)
    return _merge_heads(y), att


def attention_backward(dout, qkv, att, n_head):
    """dout (B, T, C), qkv (B, T, 3C), att (B, H, T, T) -> dqkv (B, T, 3C)."""
    dout, qkv, att = _f64(dout), _f64(qkv), _f64(att)
    C = qkv.shape[-1] // 3
    hs = C // n_head
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))
    dy = _split_heads(dout, n_head)                           # (B, H, T, hs)
    # y = att @ v
    datt = dy @ v.transpose(0, 1, 3, 2)                       # (B, H, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dy
    # softmax backward, row by row: dscore = att * (datt - sum(att * datt)).
    # Masked entries have att == 0, so their gradient is 0 automatically.
    dscores = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    # scores = q @ k^T / sqrt(hs)
    dq = dscores @ k / math.sqrt(hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


# --------------------------------------------------------------------------
# GELU, tanh approximation
# --------------------------------------------------------------------------

def gelu_forward(x):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), elementwise."""
    x = _f64(x)
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3)))


def gelu_backward(dout, x):
    """dout, x same shape -> dx (same shape)."""
    dout, x = _f64(dout), _f64(x)
    u = GELU_SCALE * (x + GELU_CUBIC * x ** 3)
    th = np.tanh(u)
    du_dx = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x ** 2)
    # product rule on 0.5 * x * (1 + tanh(u)); tanh' = 1 - tanh^2
    local = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * du_dx
    return dout * local


def gelu_exact_forward(x):
    """x * Phi(x), Phi the standard normal CDF (nanoGPT's nn.GELU()), elementwise."""
    x = _f64(x)
    return x * ndtr(x)


def gelu_exact_backward(dout, x):
    """dout, x same shape -> dx: d/dx [x Phi(x)] = Phi(x) + x phi(x)."""
    dout, x = _f64(dout), _f64(x)
    density = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dout * (ndtr(x) + x * density)


GELU = {"tanh": (gelu_forward, gelu_backward), "exact": (gelu_exact_forward, gelu_exact_backward)}


# --------------------------------------------------------------------------
# Cross-entropy (mean over tokens, natural log)
# --------------------------------------------------------------------------

def crossentropy_forward(logits, targets):
    """logits (..., V), targets (...) int -> (loss_mean float, probs (..., V)).

    Works for (B, T, V) with (B, T) targets and (N, V) with (N,) targets.
    """
    logits = _f64(logits)
    targets = np.asarray(targets)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    z = z - z.max(axis=-1, keepdims=True)
    logprobs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    loss = -logprobs[np.arange(len(t)), t].mean()
    return float(loss), np.exp(logprobs).reshape(logits.shape)


def crossentropy_backward(probs, targets):
    """probs (..., V), targets (...) -> dlogits (..., V) of the *mean* loss:
    (probs - onehot(targets)) / number_of_tokens."""
    probs = _f64(probs)
    targets = np.asarray(targets)
    V = probs.shape[-1]
    d = probs.reshape(-1, V).copy()
    n = d.shape[0]
    d[np.arange(n), targets.reshape(-1)] -= 1.0
    return (d / n).reshape(probs.shape)


# --------------------------------------------------------------------------
# AdamW (PyTorch semantics: decoupled weight decay on the pre-update param)
# --------------------------------------------------------------------------

def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One step for one tensor; t is the 1-based step number.
    Returns new (p, m, v); the inputs are not modified."""
    p, g, m, v = _f64(p), _f64(g), _f64(m), _f64(v)
    p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    mhat = m / (1.0 - beta1 ** t)
    vhat = v / (1.0 - beta2 ** t)
    p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p, m, v


# --------------------------------------------------------------------------
# The whole GPT
# --------------------------------------------------------------------------

def param_shapes(V, block_size, n_layer, n_embd, bias=True):
    """Name -> shape of every trainable tensor (lm_head is tied to wte);
    bias=False leaves out every '.bias' tensor."""
    C = n_embd
    shapes = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (block_size, C),
    }
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,),
        })
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    if not bias:
        shapes = {k: v for k, v in shapes.items() if not k.endswith(".bias")}
    return shapes


def init_params(V, block_size, n_layer, n_head, n_embd, rng, bias=True):
    """Random, deliberately non-trivial float64 parameters for testing
    (not nanoGPT's training init). rng is a numpy Generator."""
    if n_embd % n_head != 0:
        raise ValueError("n_embd must be divisible by n_head")
    params = {}
    for name, shape in param_shapes(V, block_size, n_layer, n_embd, bias).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[name] = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            params[name] = rng.normal(0.0, 0.1, shape)
        else:
            params[name] = rng.normal(0.0, 0.3, shape)
    return params


def _n_layer(params):
    layers = [int(m.group(1)) for k in params
              if (m := re.fullmatch(r"transformer\.h\.(\d+)\.ln_1\.weight", k))]
    return max(layers) + 1 if layers else 0


def gpt_forward(params, idx, targets=None, *, n_head, gelu="tanh"):
    """params: name -> array (an 'lm_head.weight' alias is ignored; without
    '.bias' entries the model has no biases); idx (B, T) int with
    T <= block_size; targets (B, T) int or None; gelu "tanh" or "exact".

    Returns (logits (B, T, V), loss float or None, cache). The cache holds
    every intermediate gpt_backward needs: 'idx', 'targets', 'probs',
    'lnf_out', 'lnf_cache', and 'layers', a list with one dict per block
    (keys 'ln1_out', 'ln1_cache', 'qkv', 'att', 'atty', 'ln2_out',
    'ln2_cache', 'fc', 'gelu').
    """
    P = {k: _f64(v) for k, v in params.items() if k != "lm_head.weight"}
    bias = P.get     # a missing bias is None: no bias
    gelu_fwd = GELU[gelu][0]
    idx = np.asarray(idx)
    wte = P["transformer.wte.weight"]
    x = embedding_forward(idx, wte, P["transformer.wpe.weight"])
    layers = []
    for i in range(_n_layer(P)):
        h = f"transformer.h.{i}."
        c = {}
        # x = x + attn(ln_1(x))
        c["ln1_out"], c["ln1_cache"] = layernorm_forward(x, P[h + "ln_1.weight"], bias(h + "ln_1.bias"))
        c["qkv"] = linear_forward(c["ln1_out"], P[h + "attn.c_attn.weight"], bias(h + "attn.c_attn.bias"))
        c["atty"], c["att"] = attention_forward(c["qkv"], n_head)
        x = x + linear_forward(c["atty"], P[h + "attn.c_proj.weight"], bias(h + "attn.c_proj.bias"))
        # x = x + mlp(ln_2(x))
        c["ln2_out"], c["ln2_cache"] = layernorm_forward(x, P[h + "ln_2.weight"], bias(h + "ln_2.bias"))
        c["fc"] = linear_forward(c["ln2_out"], P[h + "mlp.c_fc.weight"], bias(h + "mlp.c_fc.bias"))
        c["gelu"] = gelu_fwd(c["fc"])
        x = x + linear_forward(c["gelu"], P[h + "mlp.c_proj.weight"], bias(h + "mlp.c_proj.bias"))
        layers.append(c)
    lnf_out, lnf_cache = layernorm_forward(x, P["transformer.ln_f.weight"], bias("transformer.ln_f.bias"))
    logits = linear_forward(lnf_out, wte)  # tied lm_head, no bias
    loss = probs = None
    if targets is not None:
        loss, probs = crossentropy_forward(logits, targets)
    cache = {"idx": idx, "targets": targets, "probs": probs, "gelu_form": gelu,
             "bias": "transformer.ln_f.bias" in P,
             "lnf_out": lnf_out, "lnf_cache": lnf_cache, "layers": layers}
    return logits, loss, cache


def gpt_backward(params, cache, *, n_head):
    """Gradient of the mean loss of the gpt_forward call that made `cache`
    (which must have been given targets). Returns name -> gradient with
    exactly the names and shapes of param_shapes (no lm_head alias)."""
    if cache["targets"] is None:
        raise ValueError("gpt_backward needs a forward pass made with targets")
    P = {k: _f64(v) for k, v in params.items() if k != "lm_head.weight"}
    wte, wpe = P["transformer.wte.weight"], P["transformer.wpe.weight"]
    grads = {}

    dlogits = crossentropy_backward(cache["probs"], cache["targets"])
    dlnf, dwte_head, _ = linear_backward(dlogits, cache["lnf_out"], wte)
    dx, grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = \
        layernorm_backward(dlnf, cache["lnf_cache"])

    for i in reversed(range(len(cache["layers"]))):
        h = f"transformer.h.{i}."
        c = cache["layers"][i]
        # x = x + mlp(ln_2(x)): dx flows straight through the residual and
        # also back through the MLP branch.
        dgelu, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = \
            linear_backward(dx, c["gelu"], P[h + "mlp.c_proj.weight"])
        dfc = GELU[cache["gelu_form"]][1](dgelu, c["fc"])
        dln2, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = \
            linear_backward(dfc, c["ln2_out"], P[h + "mlp.c_fc.weight"])
        dx_branch, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = \
            layernorm_backward(dln2, c["ln2_cache"])
        dx = dx + dx_branch
        # x = x + attn(ln_1(x))
        datty, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = \
            linear_backward(dx, c["atty"], P[h + "attn.c_proj.weight"])
        dqkv = attention_backward(datty, c["qkv"], c["att"], n_head)
        dln1, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = \
            linear_backward(dqkv, c["ln1_out"], P[h + "attn.c_attn.weight"])
        dx_branch, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = \
            layernorm_backward(dln1, c["ln1_cache"])
        dx = dx + dx_branch

    dwte_emb, grads["transformer.wpe.weight"] = \
        embedding_backward(dx, cache["idx"], wte.shape[0], wpe.shape[0])
    # wte is used twice (embedding lookup and tied lm_head): sum both.
    grads["transformer.wte.weight"] = dwte_emb + dwte_head
    return {name: grads[name] for name in
            param_shapes(wte.shape[0], wpe.shape[0], len(cache["layers"]), wte.shape[1],
                         cache["bias"])}
