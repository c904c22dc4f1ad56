#!/usr/bin/env python
"""Is femtogpt's default run nanoGPT's recipe? Train both from the same weights.

    python scripts/recipe_parity.py --nanogpt ~/nanoGPT [--steps 300]

nanoGPT's own model.py (imported from the checkout) and femtogpt's baby preset
start from the same initial weights (nanoGPT's, seed 1337) and see the same
batches; each steps with its own optimizer, schedule and clipping (nanoGPT's
configure_optimizers, its train.py's get_lr and clip_grad_norm_, transcribed;
femtogpt's Run.train_step). If the recipes are the same, the two loss curves
agree to float32 drift (which grows slowly over the steps); a different
schedule, decay split, clip or init scale shows as a gap within tens of steps.
This separates a recipe difference from seed noise, which a seed study alone
cannot. Needs torch.
"""
import argparse
import math
import os
import sys
import tempfile

import numpy as np


def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay_iters=2000):
    # nanoGPT's train.py get_lr, with config/train_shakespeare_char.py's values.
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", metavar="DIR", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.nanogpt))
    import model as nanogpt_model     # nanoGPT's model.py

    from femtogpt.train import PRESETS, Run
    from femtogpt.train.batches import get_batch

    cfg = PRESETS["baby"]
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg.__class__(**{**cfg.__dict__, "out": out, "threads": args.threads}),
                  log=lambda *a: None)
        femto = run.model
        V = femto.config.vocab_size
        torch.manual_seed(1337)
        ref = nanogpt_model.GPT(nanogpt_model.GPTConfig(
            block_size=cfg.block_size, vocab_size=V, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias))
        if cfg.gelu != "exact":
            sys.exit("the baby preset is expected to use the exact GELU, as nanoGPT")
        state = {k: v.detach().numpy() for k, v in ref.state_dict().items()
                 if not k.endswith(".attn.bias")}
        femto.load_state_dict(state)
        opt = ref.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                       (cfg.beta1, cfg.beta2), "cpu")
        rng = np.random.default_rng(0)
        print("step  lr         nanoGPT loss  femtogpt loss  |diff|")
        worst = 0.0
        for it in range(args.steps):
            x, y = get_batch(run.train_ids, cfg.batch_size, cfg.block_size, rng, "train")
            lr = nanogpt_lr(it)
            for group in opt.param_groups:
                group["lr"] = lr
            _, loss = ref(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            f_loss, f_lr, _ = run.train_step(batch=(x, y))
            if abs(f_lr - lr) > 1e-12 * max(1.0, lr):
                print(f"learning rate differs at step {it}: nanoGPT {lr}, femtogpt {f_lr}")
            diff = abs(loss.item() - f_loss)
            worst = max(worst, diff)
            if it % 25 == 0 or it == args.steps - 1:
                print(f"{it:4d}  {lr:.3e}  {loss.item():.6f}      {f_loss:.6f}       {diff:.2e}")
        w_ref, w_femto = ref.state_dict(), femto.state_dict()
        rel = max(float(np.abs(w_femto[k] - w_ref[k].numpy()).max()
                        / (np.abs(w_ref[k].numpy()).max() + 1e-30))
                  for k in state)
        # Both models' val loss on the same 20 batches (nanoGPT's --eval_iters=20).
        ref.eval()
        femto.eval()
        val = [get_batch(run.val_ids, cfg.batch_size, cfg.block_size, rng, "val")
               for _ in range(cfg.eval_iters)]
        with torch.no_grad():
            ref_val = np.mean([ref(torch.from_numpy(x), torch.from_numpy(y))[1].item()
                               for x, y in val])
        femto_val = np.mean([femto.loss(x, y) for x, y in val])
        print(f"largest loss difference over {args.steps} steps: {worst:.2e}; "
              f"largest relative weight difference at the end: {rel:.2e}")
        print(f"val loss on the same {len(val)} batches: nanoGPT {ref_val:.6f}, "
              f"femtogpt {femto_val:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
