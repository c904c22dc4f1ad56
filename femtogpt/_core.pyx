# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""femtogpt's compiled core: float32 storage and every forward/backward kernel.

Reading order (the files are in femtogpt/kernels/, joined below)
  1. buffer.pxi       Buffer: aligned float32 storage that numpy views without copying
  2. threads.pxi      one thread pool (OpenMP), and how work is cut for it
     gemm.pxi         the GEMM front: sgemm from scipy's OpenBLAS, pinned to one
                      thread and called on per-thread slices of the product
     gemm_bf16.pxi    its bf16 half (gemm_bf16.h: bf16 operands, fp32 sums),
                      sliced the same way, and the packed weights' types
     gemm_q8.pxi      its int8 half for sampling (gemm_q8.h: q8 weights and rows)
     vecmath.pxi      exp, sigmoid and dot written so that gcc vectorises them
     checks.pxi       the checks every Python entry point runs first
  3. kernels          <op>_forward / <op>_backward pairs over flat float* buffers,
                      `noexcept nogil`, llm.c's argument order:
                      outputs and caches, then inputs, then parameters, then sizes;
                      each file ends with its `def py_*` wrappers (tests, readers)
     encoder.pxi      token + position embedding
     layernorm.pxi    LayerNorm
     matmul.pxi       the linear layer (and its one-row form for decoding)
     dropout.pxi      dropout with counter-based masks
     residual.pxi     the residual add
     gelu.pxi         GELU, tanh and exact forms
     attention.pxi    causal multi-head self-attention (and the q/k/v split)
     crossentropy.pxi fused softmax + cross-entropy
     adamw.pxi        AdamW and the gradient norm
     sampling.pxi     one token from a row of logits: temperature, top-k, top-p
  4. the graph
     layout.pxi       the parameter and activation blocks, each layer's slices of
                      them and its dropout streams, named once; the bf16 packed
                      weights and workspace
     profile.pxi      the opt-in per-op timer (GPT.profile)
     linear_weights.pxi  the linear layers as sampling reads them: fp32 views,
                      or bf16/int8 copies made once at load; linear_rows()
     graph_blocks.pxi GraphBlocks: the blocks a graph runs over, its dtype and
                      packed bf16 weights, its per-op profile
     training_graph.pxi  TrainingGraph: forward, backward over the blocks
     decoding.pxi     Decoder: the inference pass (a prompt's positions at once,
                      or one per row) over the KV cache
     graph.pxi        Graph: the TrainingGraph with a Decoder and the sampling
                      type of its linear layers, as femtogpt.model uses it
     generate.pxi     the sampling loop

Conventions
  * Row-major everywhere. A "row" is one (batch, time) position: N = B*T rows.
  * Linear weights are stored as PyTorch does, (out, in): y = x @ W^T + b.
  * Backward passes ACCUMULATE (+=) into parameter gradients, so zeroing the
    gradients is one memset and gradient accumulation is free. Gradients with
    respect to activations are WRITTEN (=), except where a kernel says otherwise
    (layernorm_backward adds into the residual stream's gradient).
  * Kernels trust their arguments. Everything they index is validated in Python
    before the GIL is released (femtogpt/model, and the def wrappers).
  * Reductions over rows (weight and bias gradients, norms) are done in a fixed
    order that does not depend on the number of threads. Matrix products are
    split into per-thread slices, and sgemm may round a slice differently from
    the whole, so 1 and 2 threads agree to about 1e-6, not bit for bit; a
    fixed thread count is bitwise reproducible.
"""

# Why `include`, not `cimport`: the files are one module, one C translation unit.
# setup.py compiles this module once per dispatch target (x86-64, -v3, -v4:
# _core_x86_64_v3.pyx and _v4.pyx include this file), and within one
# translation unit gcc inlines the `cdef inline` helpers (fast_expf, gemm_slice,
# layernorm_row, ...) into every kernel that calls them and vectorises the
# result with that target's -march. Split into .pxd/.pyx modules joined by
# `cimport`, each would be a separate extension calling the others through
# function pointers: no inlining across files, so no vectorised exp inside the
# softmax loops, and every target's modules would have to be kept apart too.
# Order matters: a file may use only what the files above it define (DEF
# constants and cdef types; cdef functions and classes may also come later).

include "kernels/buffer.pxi"
include "kernels/threads.pxi"
include "kernels/gemm.pxi"
include "kernels/gemm_bf16.pxi"
include "kernels/gemm_q8.pxi"
include "kernels/vecmath.pxi"
include "kernels/checks.pxi"

include "kernels/encoder.pxi"
include "kernels/layernorm.pxi"
include "kernels/matmul.pxi"
include "kernels/dropout.pxi"
include "kernels/residual.pxi"
include "kernels/gelu.pxi"
include "kernels/attention.pxi"
include "kernels/crossentropy.pxi"
include "kernels/adamw.pxi"
include "kernels/sampling.pxi"

include "kernels/layout.pxi"
include "kernels/profile.pxi"
include "kernels/linear_weights.pxi"
include "kernels/graph_blocks.pxi"
include "kernels/training_graph.pxi"
include "kernels/decoding.pxi"
include "kernels/graph.pxi"
include "kernels/generate.pxi"


cdef extern from *:
    """
    #ifndef FEMTOGPT_TARGET
    #define FEMTOGPT_TARGET "unknown"
    #endif
    """
    const char* FEMTOGPT_TARGET

# The code path this module was compiled for (setup.py): "x86-64", "x86-64-v3" or
# "x86-64-v4" in a portable build (femtogpt/_dispatch.py picks one), "native" or
# "plain" in a single build. The same source is compiled once per target.
TARGET = FEMTOGPT_TARGET.decode()
