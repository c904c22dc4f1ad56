"""Resident memory and speed of sampling-only models at GPT-2 shapes (random weights).

    python scripts/sampling_memory.py gpt2       # GPT-2 124M
    python scripts/sampling_memory.py gpt2-xl    # 1.5B: 6.2 GB of weights

Builds the model, samples 20 tokens with the KV cache, and prints the resident
memory after building and after sampling (VmRSS) and the peak (which includes
the random initialisation's temporaries). A model that only samples never
writes its gradient block, whose pages therefore cost nothing (_core.Buffer).
"""
import resource, time, sys, numpy as np
from femtogpt.model import GPT, GPTConfig
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
name = sys.argv[1]
shape = {"gpt2": (12, 12, 768), "gpt2-xl": (48, 25, 1600)}[name]
cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=shape[0], n_head=shape[1], n_embd=shape[2], bias=True, gelu="tanh")
t = time.perf_counter()
m = GPT(cfg, seed=0)
m.eval()
built = rss()
t1 = time.perf_counter()
out = m.generate(np.array([[1, 2, 3]]), 20, temperature=0.8, top_k=200, seed=1)
dt = time.perf_counter() - t1
print(f"{name}: {m.num_parameters()/1e6:.0f}M params, RSS after build {built:,.0f} MB, after sampling {rss():,.0f} MB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:,.0f} MB, {20/dt:.1f} tok/s")
