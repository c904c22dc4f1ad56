# The graph's memory and modes, below its passes (training_graph.pxi): the
# blocks it runs over, the dtype of its matrix products with the packed bf16
# weights, and the per-op profile.
#
# Mixed precision (set_dtype("bf16")), as PyTorch's CPU autocast does it: the
# parameters, their gradients and everything outside the matrix products stay
# fp32; every product (the linear layers forward and backward, the lm_head,
# attention's q @ k^T and att @ v) rounds its operands to bf16 and accumulates
# in fp32 (gemm_bf16.pxi). The weights' bf16 copies are packed once after each
# change (weights_changed(): the model calls it whenever it hands out writable
# weight memory, AdamW's step included) at the start of the next forward, so
# gradient accumulation packs once per optimizer step, not per micro-batch.

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int32_t, uint16_t, uint64_t
from libc.string cimport memset
import numpy as np


cdef class GraphBlocks:
    """What the passes run over: the parameter and gradient blocks (given), the
    activation block (owned, sized for the largest (B, T) seen), the dtype with
    its packed bf16 weights, and the per-op profile. TrainingGraph adds the
    forward and backward passes; it is never used alone."""
    cdef readonly int V, max_T, L, NH, C
    cdef readonly bint bias             # Linear and LayerNorm layers have biases
    cdef readonly bint gelu_exact       # GELU's exact (erf) form, else tanh
    cdef readonly int B, T              # shape of the last forward
    cdef readonly bint has_targets      # last forward had targets: backward is allowed
    cdef readonly bint logits_are_gradient  # backward ran: the logits block holds dlogits
    cdef readonly double loss
    cdef Buffer params_buf, grads_buf, acts_buf
    cdef Params p, g
    cdef Activations a
    cdef int n_slots
    cdef float dropout
    cdef uint64_t seed
    cdef int32_t[::1] idx, targets
    cdef bint busy            # a call is running (see _acquire)
    cdef readonly bint fp32_released  # the fp32 matrices were given back (graph.pxi)
    # bf16 (set_dtype): packed weights, allocated once, and a workspace per (B, T)
    cdef readonly bint bf16             # the matrix products run in bf16
    cdef readonly Py_ssize_t pack_count  # times the weights were packed (tests)
    cdef bint packs_stale               # the fp32 weights changed since the last pack
    cdef bint fwd_bf16                  # the last forward's products were bf16
    cdef Buffer packs_buf, bf16_buf
    cdef LayerPacks* packs              # (L) per-layer packed weights, or NULL
    cdef PackedWeight lm_pack           # wte, packed for the lm_head
    cdef Bf16Work bw
    cdef Profile prof

    def __init__(self, int V, int max_T, int L, int NH, int C,
                 Buffer params not None, Buffer grads not None, dict offsets not None,
                 bint bias=True, bint gelu_exact=False):
        _need_positive(V=V, max_T=max_T, L=L, NH=NH, C=C)
        if C % NH:
            raise ValueError(f"C={C} is not divisible by NH={NH}")
        _check_param_offsets(V, max_T, L, C, bias, offsets, params, grads)
        self.V, self.max_T, self.L, self.NH, self.C = V, max_T, L, NH, C
        self.bias, self.gelu_exact = bias, gelu_exact
        self.params_buf, self.grads_buf = params, grads
        self.p = _param_pointers(params.data, offsets)
        self.g = _param_pointers(grads.data, offsets)
        self.acts_buf = None
        self.B = self.T = 0
        self.has_targets = False
        self.busy = False
        self.fp32_released = False
        self.bf16 = False
        self.packs_stale = True
        self.fwd_bf16 = False
        self.prof.on = False
        prof_reset(&self.prof)

    def __dealloc__(self):
        PyMem_Free(self.packs)

    # -- dtype --------------------------------------------------------------------

    def set_dtype(self, str dtype):
        """"fp32" (sgemm) or "bf16" (mixed precision: see the top of this file).
        The first switch to bf16 allocates the packed weights (the size of the
        fp32 weights: two bf16 layouts of each matrix)."""
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
        if self.busy:
            raise RuntimeError("set_dtype() while this model is running a call")
        self._need_fp32("set_dtype()")
        if dtype == "bf16" and self.packs == NULL:
            self.packs = <LayerPacks*>PyMem_Malloc(self.L * sizeof(LayerPacks))
            if self.packs == NULL:
                raise MemoryError()
            need = pack_layout(self.packs, &self.lm_pack, NULL, self.L, self.C, self.V)
            self.packs_buf = Buffer((need + 1) // 2)
            pack_layout(self.packs, &self.lm_pack, <uint16_t*>self.packs_buf.data,
                        self.L, self.C, self.V)
        self.bf16 = dtype == "bf16"
        self.packs_stale = True

    cdef _need_fp32(self, str what):
        # The training passes read the fp32 matrices, which a model converted
        # for sampling gave back.
        if self.fp32_released:
            raise RuntimeError(f"{what} needs the fp32 weights, and this model keeps only "
                               f"its sampling copies: load it again without a dtype to train")

    @property
    def dtype(self):
        return "bf16" if self.bf16 else "fp32"

    def weights_changed(self):
        """The fp32 weights may have changed: repack the bf16 copies at the next
        forward. Cheap (a flag); the model calls it on every writable access."""
        self.packs_stale = True

    cdef void _pack_weights(self) noexcept nogil:
        # Both layouts of every matrix, from the fp32 parameters.
        cdef int C = self.C, l, n = openmp.omp_get_max_threads()
        cdef LayerParams lw
        for l in range(self.L):
            lw = layer_params(&self.p, l, C)
            pack_weight(&self.packs[l].qkvw, lw.qkvw, qkv_width(C), C, n)
            pack_weight(&self.packs[l].attprojw, lw.attprojw, C, C, n)
            pack_weight(&self.packs[l].fcw, lw.fcw, 4 * C, C, n)
            pack_weight(&self.packs[l].fcprojw, lw.fcprojw, C, 4 * C, n)
        pack_weight(&self.lm_pack, self.p.wte, self.V, C, n)
        self.packs_stale = False
        self.pack_count += 1

    # -- profile ------------------------------------------------------------------

    def profile(self, bint on=True):
        self.prof.on = on

    @property
    def profiling(self):
        return self.prof.on

    def profile_reset(self):
        prof_reset(&self.prof)

    def profile_report(self):
        return prof_report(&self.prof)

    def profile_add(self, str op, str phase, double seconds, double flops=0.0):
        """Charge time measured outside the graph (the optimizer's kernels)."""
        cdef int o = OP_NAMES.index(op), ph = PHASE_NAMES.index(phase)
        if self.prof.on:
            self.prof.seconds[o][ph] += seconds
            self.prof.flops[o][ph] += flops
            self.prof.calls[o][ph] += 1

    cdef _prepare(self, int B, int T, bint mixed=False):
        # Grow the activation block when (B, T) needs more room, then lay it out.
        cdef int n_slots = openmp.omp_get_max_threads()
        cdef Py_ssize_t need = activation_layout(&self.a, NULL, B, T, n_slots,
                                                 self.C, self.L, self.V, self.NH)
        if self.acts_buf is None or self.acts_buf.size < need:
            self.acts_buf = None    # free the old block before allocating the new one
            self.acts_buf = Buffer(need)
        activation_layout(&self.a, self.acts_buf.data, B, T, n_slots,
                          self.C, self.L, self.V, self.NH)
        if mixed:
            # bytes, in a Buffer of floats
            need = bf16_work_layout(&self.bw, NULL, B, T, n_slots, self.C, self.V, self.NH)
            if self.bf16_buf is None or self.bf16_buf.size * 4 < need:
                self.bf16_buf = None
                self.bf16_buf = Buffer((need + 3) // 4)
            bf16_work_layout(&self.bw, <char*>self.bf16_buf.data, B, T, n_slots,
                             self.C, self.V, self.NH)
        self.n_slots = n_slots
        self.B, self.T = B, T

    @property
    def activation_bytes(self):
        return 0 if self.acts_buf is None else self.acts_buf.size * 4

    def logits_view(self):
        """The last forward's logits, (B*T*V,) as a view into the activation block."""
        if self.acts_buf is None:
            raise RuntimeError("no forward() has run yet")
        cdef Py_ssize_t off = self.a.logits - self.acts_buf.data
        with nogil:
            self._restore_logits()
        return np.asarray(self.acts_buf)[off:off + <Py_ssize_t>self.B * self.T * self.V]

    def attention_view(self):
        """The last forward's attention probabilities, (L*B*NH*T*T,) as a view
        into the activation block ((L, B, NH, T, T) in that order), or None when
        the batch was too large to keep them (backward recomputes them then)."""
        if self.acts_buf is None:
            raise RuntimeError("no forward() has run yet")
        if self.a.att == NULL:
            return None
        cdef Py_ssize_t off = self.a.att - self.acts_buf.data
        cdef Py_ssize_t n = <Py_ssize_t>self.L * self.B * self.NH * self.T * self.T
        return np.asarray(self.acts_buf)[off:off + n]

    cdef void _restore_logits(self) noexcept nogil:
        # backward() overwrites the logits with their gradient; read again (a
        # second backward, logits_view), they are recomputed from the final
        # LayerNorm's output, which forward kept: the same sgemm on the same
        # inputs, so the same numbers bit for bit.
        if self.logits_are_gradient:
            matmul_forward(self.a.logits, self.a.lnf, self.p.wte, NULL,
                           <Py_ssize_t>self.B * self.T, self.C, self.V,
                           &self.lm_pack if self.fwd_bf16 else NULL, &self.bw)
            self.logits_are_gradient = False
