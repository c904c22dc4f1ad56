"""What a model computes for a text, for `femtogpt serve` to show: each
token's next-token probabilities, how surprised the model is by each token
(its loss), and the attention pattern of any layer and head.

Everything comes from one forward pass of the model (the same kernels as
training and sampling), with dropout off: the logits give the probabilities
and the losses, the attention kernel's kept probabilities give the patterns.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import DataError


def token_pieces(tokenizer, ids):
    """The text of each token. A token that is part of a character (the byte
    tokenizer, or BPE's bytes) shows as its bytes in hex, e.g. <e6>."""
    pieces = []
    for i in ids:
        data = tokenizer.decode_bytes([int(i)])
        try:
            pieces.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("".join(f"<{b:02x}>" for b in data))
    return pieces


def encode_for_probe(model, tokenizer, text, what="text"):
    """The ids of text, which must fit the model's context."""
    if not text:
        raise DataError(f"the {what} is empty")
    ids = tokenizer.encode(text, what=what)
    if len(ids) > model.config.block_size:
        raise DataError(f"the {what} is {len(ids):,} tokens; this model reads at most "
                        f"{model.config.block_size:,} (its context): shorten it")
    return ids


def analyze(model, tokenizer, text, top=10):
    """For each token of text: its text, the loss of predicting it from the
    tokens before it (nats; None for the first, which has no context), and the
    model's `top` most likely next tokens after it, with their probabilities.
    Also the mean loss and the bits per character of the text after its first
    token."""
    ids = encode_for_probe(model, tokenizer, text)
    model.eval()
    logits, _ = model.forward(np.array([ids], dtype=np.int64))
    logits = logits[0]                                  # (T, V) float32
    # log p = logit - max - log(sum(exp(logit - max))), row by row: at GPT-2's
    # size (T = 1024, V = 50,257) a float64 copy of the logits alone is 400 MB.
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.array([np.log(np.exp(row - m, dtype=np.float64).sum())
                         for row, m in zip(logits, peak[:, 0])])[:, None] + peak

    def probs(t, j):
        return np.exp(logits[t, j].astype(np.float64) - log_norm[t])

    top = max(1, min(int(top), model.config.vocab_size))
    if top < model.config.vocab_size:
        candidates = np.argpartition(-logits, top - 1, axis=1)[:, :top]
    else:
        candidates = np.broadcast_to(np.arange(top), (len(ids), top))
    best = [c[np.argsort(-logits[t, c], kind="stable")] for t, c in enumerate(candidates)]
    losses = [None] + [float(log_norm[t - 1, 0] - logits[t - 1, ids[t]])
                       for t in range(1, len(ids))]
    pieces = token_pieces(tokenizer, ids)
    vocab_pieces = {}

    def piece(i):
        if i not in vocab_pieces:
            vocab_pieces[i] = token_pieces(tokenizer, [i])[0]
        return vocab_pieces[i]

    tokens = []
    for t, (i, text_piece) in enumerate(zip(ids, pieces)):
        tokens.append({"id": int(i), "text": text_piece, "loss": losses[t],
                       "next": [{"id": int(j), "text": piece(int(j)),
                                 "p": float(p)} for j, p in zip(best[t], probs(t, best[t]))]})
    scored = [x for x in losses if x is not None]
    mean = sum(scored) / len(scored) if scored else None
    chars_after_first = len(text) - len(tokenizer.decode(ids[:1]))
    bpc = (sum(scored) / math.log(2) / chars_after_first) if scored and chars_after_first > 0 \
        else None
    return {"tokens": tokens, "mean_loss": mean, "bits_per_char": bpc}


def attention(model, tokenizer, text, layer, head):
    """(T, T) nested lists: how much each token attends to each earlier one, in
    one layer and head; and the tokens' text."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer or not 0 <= head < cfg.n_head:
        raise DataError(f"layer must be in 0..{cfg.n_layer - 1} and head in "
                        f"0..{cfg.n_head - 1}, got layer {layer}, head {head}")
    if model.weights_dtype != "fp32":
        raise DataError(f"the attention view reads the fp32 model; this one samples in "
                        f"{model.weights_dtype} (serve without --dtype to see it)")
    ids = encode_for_probe(model, tokenizer, text)
    model.eval()
    model.loss(np.array([ids], dtype=np.int64), np.array([ids], dtype=np.int64))
    probs = model.attention_probs()
    if probs is None:
        raise DataError("this text is too long for the attention pattern to be kept")
    matrix = probs[layer, 0, head]
    return {"tokens": token_pieces(tokenizer, ids),
            "matrix": [[round(float(v), 5) for v in row[:i + 1]]
                       for i, row in enumerate(matrix)]}
