# The training graph: the GPT's forward and backward over one parameter block,
# one gradient block and one activation block laid out once per (B, T)
# (layout.pxi); AdamW (adamw.pxi) then updates the parameter block in one loop,
# called by femtogpt/train. Graph (graph.pxi) is this class with the inference pass.
#
# The matrix products' dtype and the packed bf16 weights are graph_blocks.pxi's.

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int32_t, uint16_t, uint64_t
from libc.string cimport memset
import numpy as np


cdef class TrainingGraph(GraphBlocks):
    """Forward and backward of the GPT, one call each, without the GIL.

    params and grads are Buffers laid out by femtogpt/model (offsets by key);
    the Graph owns the activation Buffer, sized for the largest (B, T) seen
    (graph_blocks.pxi: the blocks, the dtype, the profile).
    """

    # -- forward ------------------------------------------------------------------

    cdef _acquire(self):
        # The buffers are shared by every call: a second call while one runs (from
        # a generate() callback, or another thread: each call releases the GIL)
        # could swap them under the first. Checked and set under the GIL.
        if self.busy:
            raise RuntimeError("this model is already running a call (re-entered from a "
                               "callback, or used by two threads at once: give each "
                               "thread its own model)")
        self.busy = True

    def forward(self, const int32_t[:, ::1] idx not None, targets=None,
                float dropout=0.0, uint64_t seed=0):
        """Run the model on idx (B, T) int32; with targets (B, T) also the mean loss.

        Returns the loss (float) or None. Ids are checked here as well as in
        femtogpt/model: the kernels index embedding rows with them.
        """
        self._acquire()
        try:
            return self._forward_checked(idx, targets, dropout, seed)
        finally:
            self.busy = False

    def _forward_checked(self, const int32_t[:, ::1] idx not None, targets,
                         float dropout, uint64_t seed, bint mixed=True):
        # mixed=False: fp32 products even in a bf16 graph (prefill: sampling
        # is fp32 for now, as the decoder is).
        cdef int B = idx.shape[0], T = idx.shape[1]
        self._need_fp32("forward()")
        # Until this forward has fully succeeded, backward() is not allowed: a
        # rejected call must not leave the previous call's state half replaced.
        self.has_targets = False
        new_idx, new_targets = _owned_batch(idx, targets, dropout, self.V, self.max_T)
        self.idx = new_idx
        if new_targets is not None:
            self.targets = new_targets
        self.fwd_bf16 = self.bf16 and mixed
        self._prepare(B, T, self.fwd_bf16)
        self.dropout, self.seed = dropout, seed
        cdef double t
        with nogil:
            if self.fwd_bf16 and self.packs_stale:
                t = prof_start(&self.prof)
                self._pack_weights()
                prof_mark(&self.prof, OP_BF16_PACK, PH_OPTIMIZER, t, 0.0)
            self._forward(targets is not None)
        self.has_targets = targets is not None
        self.logits_are_gradient = False
        return self.loss if targets is not None else None

    cdef void _forward(self, bint with_targets) noexcept nogil:
        # Each kernel call is followed by its profile mark (one branch when off).
        cdef int B = self.B, T = self.T, C = self.C, NH = self.NH, V = self.V
        cdef Py_ssize_t N = <Py_ssize_t>B * T, l
        cdef Py_ssize_t NC = N * C
        cdef float p = self.dropout
        cdef Params* w = &self.p
        cdef Activations* a = &self.a
        cdef Py_ssize_t att_size = <Py_ssize_t>B * NH * T * T
        cdef LayerParams lw
        cdef LayerActs la
        cdef LayerDropout ld
        cdef double total = 0.0
        cdef Py_ssize_t n
        # bf16: the packed weights and the workspace; NULL: fp32 products
        cdef Bf16Work* bw = &self.bw if self.fwd_bf16 else NULL
        cdef LayerPacks* packs = self.packs if self.fwd_bf16 else NULL
        cdef LayerPackPtrs lk
        cdef Profile* pr = &self.prof
        cdef double mm = 2.0 * N * C * C        # FLOPs of an N x C x C product
        cdef double att_flops = 4.0 * B * T * <double>T * C
        cdef double t = prof_start(pr)
        encoder_forward(a.encoded, &self.idx[0], w.wte, w.wpe, B, T, C)
        t = prof_mark(pr, OP_EMBEDDING, PH_FORWARD, t, 0.0)
        if p > 0.0:
            dropout_forward(a.encoded, a.encoded, NC, p, embedding_dropout_seed(self.seed))
            t = prof_mark(pr, OP_DROPOUT, PH_FORWARD, t, 0.0)
        for l in range(self.L):
            lw = layer_params(w, l, C)
            la = layer_acts(a, l, N, C, att_size)
            ld = layer_dropout(self.seed, l)
            lk = layer_packs(packs, l)
            # x = x + dropout(c_proj(attention(ln_1(x))))
            layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, la.res_in, lw.ln1w, lw.ln1b,
                              N, C)
            t = prof_mark(pr, OP_LAYERNORM, PH_FORWARD, t, 0.0)
            matmul_forward(la.qkv, la.ln1, lw.qkvw, lw.qkvb, N, C, qkv_width(C), lk.qkvw, bw)
            t = prof_mark(pr, OP_QKV, PH_FORWARD, t, 3 * mm)
            attention_forward(la.atty, la.att, a.att_scratch, la.qkv, B, T, C, NH,
                              p, ld.att, self.n_slots, bw)
            t = prof_mark(pr, OP_ATTENTION, PH_FORWARD, t, att_flops)
            matmul_forward(a.branch, la.atty, lw.attprojw, lw.attprojb, N, C, C,
                           lk.attprojw, bw)
            t = prof_mark(pr, OP_ATTPROJ, PH_FORWARD, t, mm)
            if p > 0.0:
                dropout_forward(a.branch, a.branch, NC, p, ld.att_proj)
                t = prof_mark(pr, OP_DROPOUT, PH_FORWARD, t, 0.0)
            residual_forward(la.res2, la.res_in, a.branch, NC)
            t = prof_mark(pr, OP_RESIDUAL, PH_FORWARD, t, 0.0)
            # x = x + dropout(c_proj(gelu(c_fc(ln_2(x)))))
            layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.res2, lw.ln2w, lw.ln2b,
                              N, C)
            t = prof_mark(pr, OP_LAYERNORM, PH_FORWARD, t, 0.0)
            matmul_forward(la.fch, la.ln2, lw.fcw, lw.fcb, N, C, 4 * C, lk.fcw, bw)
            t = prof_mark(pr, OP_FC, PH_FORWARD, t, 4 * mm)
            if self.gelu_exact:
                gelu_exact_forward(la.fch_gelu, la.fch, 4 * NC)
            else:
                gelu_tanh_forward(la.fch_gelu, la.fch, 4 * NC)
            t = prof_mark(pr, OP_GELU, PH_FORWARD, t, 0.0)
            matmul_forward(a.branch, la.fch_gelu, lw.fcprojw, lw.fcprojb, N, 4 * C, C,
                           lk.fcprojw, bw)
            t = prof_mark(pr, OP_FCPROJ, PH_FORWARD, t, 4 * mm)
            if p > 0.0:
                dropout_forward(a.branch, a.branch, NC, p, ld.mlp_proj)
                t = prof_mark(pr, OP_DROPOUT, PH_FORWARD, t, 0.0)
            residual_forward(la.res3, la.res2, a.branch, NC)
            t = prof_mark(pr, OP_RESIDUAL, PH_FORWARD, t, 0.0)
        la = layer_acts(a, self.L - 1, N, C, att_size)     # the last block's output
        layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, la.res3, w.lnfw, w.lnfb, N, C)
        t = prof_mark(pr, OP_LAYERNORM, PH_FORWARD, t, 0.0)
        # lm_head tied to wte
        matmul_forward(a.logits, a.lnf, w.wte, NULL, N, C, V,
                       &self.lm_pack if bw != NULL else NULL, bw)
        t = prof_mark(pr, OP_LM_HEAD, PH_FORWARD, t, 2.0 * N * C * V)
        if with_targets:
            crossentropy_forward(a.losses, a.lse, a.logits, &self.targets[0], N, V)
            for n in range(N):
                total += a.losses[n]
            self.loss = total / N
            prof_mark(pr, OP_LOSS, PH_FORWARD, t, 0.0)

    # -- backward -------------------------------------------------------------------

    def backward(self, double loss_scale=1.0):
        """Add the last forward's gradients of loss_scale x the mean loss into the
        grads buffer (a data-parallel rank passes its share of the global batch)."""
        if not self.has_targets:
            raise RuntimeError("backward() needs a forward() with targets first")
        if not (loss_scale > 0.0 and loss_scale < float("inf")):
            raise ValueError(f"loss_scale must be positive and finite, got {loss_scale}")
        # d(scaled mean loss)/d(each row's loss), rounded once to float32.
        cdef float dloss = <float>(loss_scale / (<double>self.B * self.T))
        self._acquire()
        try:
            with nogil:
                self._restore_logits()
                self.logits_are_gradient = True
                self._backward(dloss)
        finally:
            self.busy = False

    cdef void _backward(self, float dloss) noexcept nogil:
        # forward() in reverse, line by line. The residual stream's gradient lives
        # in one buffer (dres): the identity path of each residual add costs
        # nothing, and each LayerNorm backward adds its branch's share into it.
        cdef int B = self.B, T = self.T, C = self.C, NH = self.NH, V = self.V
        cdef Py_ssize_t N = <Py_ssize_t>B * T, l
        cdef Py_ssize_t NC = N * C
        cdef float p = self.dropout
        cdef Params* w = &self.p
        cdef Params* g = &self.g
        cdef Activations* a = &self.a
        cdef Py_ssize_t att_size = <Py_ssize_t>B * NH * T * T
        cdef LayerParams lw, lg
        cdef LayerActs la
        cdef LayerDropout ld
        cdef float* dbranch
        cdef Bf16Work* bw = &self.bw if self.fwd_bf16 else NULL
        cdef LayerPacks* packs = self.packs if self.fwd_bf16 else NULL
        cdef LayerPackPtrs lk
        cdef Profile* pr = &self.prof
        cdef double mm = 4.0 * N * C * C        # FLOPs of dx and dW of an N x C x C product
        # dv, d(att), dq, dk; and q @ k^T again when the probabilities were not kept
        cdef double att_flops = (8.0 if a.att != NULL else 10.0) * B * T * <double>T * C
        cdef double t = prof_start(pr)
        # In place: the logits become their gradient (the row's lse is all that
        # softmax needs), so the (N, V) block is held once, not twice.
        crossentropy_backward(a.logits, a.logits, a.lse, &self.targets[0], dloss, N, V)
        t = prof_mark(pr, OP_LOSS, PH_BACKWARD, t, 0.0)
        matmul_backward(a.dln, g.wte, NULL, a.logits, a.lnf, w.wte, N, C, V,
                        &self.lm_pack if bw != NULL else NULL, bw)
        t = prof_mark(pr, OP_LM_HEAD, PH_BACKWARD, t, 4.0 * N * C * V)
        memset(a.dres, 0, NC * sizeof(float))
        la = layer_acts(a, self.L - 1, N, C, att_size)
        layernorm_backward(a.dres, g.lnfw, g.lnfb, a.dln, la.res3, w.lnfw, a.lnf_mean,
                           a.lnf_rstd, N, C)
        t = prof_mark(pr, OP_LAYERNORM, PH_BACKWARD, t, 0.0)
        for l in range(self.L - 1, -1, -1):
            lw = layer_params(w, l, C)
            lg = layer_params(g, l, C)
            la = layer_acts(a, l, N, C, att_size)
            ld = layer_dropout(self.seed, l)
            lk = layer_packs(packs, l)
            # mlp branch
            dbranch = a.dres
            if p > 0.0:
                dropout_backward(a.dbranch, a.dres, NC, p, ld.mlp_proj)
                dbranch = a.dbranch
                t = prof_mark(pr, OP_DROPOUT, PH_BACKWARD, t, 0.0)
            matmul_backward(a.dfch, lg.fcprojw, lg.fcprojb, dbranch, la.fch_gelu, lw.fcprojw,
                            N, 4 * C, C, lk.fcprojw, bw)
            t = prof_mark(pr, OP_FCPROJ, PH_BACKWARD, t, 4 * mm)
            if self.gelu_exact:
                gelu_exact_backward(a.dfch, la.fch, a.dfch, 4 * NC)
            else:
                gelu_tanh_backward(a.dfch, la.fch, a.dfch, 4 * NC)
            t = prof_mark(pr, OP_GELU, PH_BACKWARD, t, 0.0)
            matmul_backward(a.dln, lg.fcw, lg.fcb, a.dfch, la.ln2, lw.fcw, N, C, 4 * C,
                            lk.fcw, bw)
            t = prof_mark(pr, OP_FC, PH_BACKWARD, t, 4 * mm)
            layernorm_backward(a.dres, lg.ln2w, lg.ln2b, a.dln, la.res2, lw.ln2w,
                               la.ln2_mean, la.ln2_rstd, N, C)
            t = prof_mark(pr, OP_LAYERNORM, PH_BACKWARD, t, 0.0)
            # attention branch
            dbranch = a.dres
            if p > 0.0:
                dropout_backward(a.dbranch, a.dres, NC, p, ld.att_proj)
                dbranch = a.dbranch
                t = prof_mark(pr, OP_DROPOUT, PH_BACKWARD, t, 0.0)
            matmul_backward(a.dln, lg.attprojw, lg.attprojb, dbranch, la.atty, lw.attprojw,
                            N, C, C, lk.attprojw, bw)
            t = prof_mark(pr, OP_ATTPROJ, PH_BACKWARD, t, mm)
            attention_backward(a.dqkv, a.att_scratch, a.dln, la.qkv, la.att, B, T, C, NH,
                               p, ld.att, self.n_slots, bw)
            t = prof_mark(pr, OP_ATTENTION, PH_BACKWARD, t, att_flops)
            matmul_backward(a.dln, lg.qkvw, lg.qkvb, a.dqkv, la.ln1, lw.qkvw, N, C,
                            qkv_width(C), lk.qkvw, bw)
            t = prof_mark(pr, OP_QKV, PH_BACKWARD, t, 3 * mm)
            layernorm_backward(a.dres, lg.ln1w, lg.ln1b, a.dln, la.res_in, lw.ln1w,
                               la.ln1_mean, la.ln1_rstd, N, C)
            t = prof_mark(pr, OP_LAYERNORM, PH_BACKWARD, t, 0.0)
        if p > 0.0:
            dropout_backward(a.dres, a.dres, NC, p, embedding_dropout_seed(self.seed))
            t = prof_mark(pr, OP_DROPOUT, PH_BACKWARD, t, 0.0)
        encoder_backward(g.wte, g.wpe, a.dres, &self.idx[0], B, T, C)
        prof_mark(pr, OP_EMBEDDING, PH_BACKWARD, t, 0.0)


cdef tuple _owned_batch(const int32_t[:, ::1] idx, targets, float dropout, int V, int max_T):
    # The ids of a forward call as the Graph's own flat copies, checked before they
    # are kept: backward() reads them later, whatever the caller does with its
    # arrays in between (and they may be read-only). Ids are checked here as well
    # as in femtogpt/model: the kernels index embedding rows with them.
    cdef int B = idx.shape[0], T = idx.shape[1]
    cdef const int32_t[:, ::1] targets_view
    cdef int32_t[::1] new_idx, new_targets = None
    if B < 1 or T < 1 or T > max_T:
        raise ValueError(f"idx must be (B, T) with B >= 1 and 1 <= T <= {max_T}")
    _check_dropout(dropout)
    new_idx = np.array(idx, dtype=np.int32, copy=True).reshape(-1)
    _need_ids(new_idx, <Py_ssize_t>B * T, V, "idx")
    if targets is not None:
        targets_view = targets
        if targets_view.shape[0] != B or targets_view.shape[1] != T:
            raise ValueError("targets must have the same shape as idx")
        new_targets = np.array(targets_view, dtype=np.int32, copy=True).reshape(-1)
        _need_ids(new_targets, <Py_ssize_t>B * T, V, "targets")
    return new_idx, new_targets
