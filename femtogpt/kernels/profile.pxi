# Opt-in timing of the graph's kernels (GPT.profile, for scripts/bench.py
# --profile): omp_get_wtime() after each kernel call of forward and backward,
# summed per op kind over the layers. Off, each mark is one branch.

cimport openmp

# Op kinds, in report order. The flops of an op are its matrix products'
# (2 per multiply-add, as computed: attention's full T x T, not the causal
# half); 0 for the elementwise ops, whose time is memory traffic.
cdef enum:
    OP_EMBEDDING, OP_LAYERNORM, OP_QKV, OP_ATTENTION, OP_ATTPROJ, OP_RESIDUAL,
    OP_DROPOUT, OP_FC, OP_GELU, OP_FCPROJ, OP_LM_HEAD, OP_LOSS,
    OP_BF16_PACK, OP_ADAMW, OP_GRAD_NORM, N_OPS

cdef enum:
    PH_FORWARD, PH_BACKWARD, PH_OPTIMIZER, N_PHASES

OP_NAMES = ("embedding", "layernorm", "qkv", "attention", "attproj", "residual",
            "dropout", "fc", "gelu", "fcproj", "lm_head", "loss",
            "bf16_pack", "adamw", "grad_norm")
PHASE_NAMES = ("forward", "backward", "optimizer")


cdef struct Profile:
    bint on
    double seconds[N_OPS][N_PHASES]
    double flops[N_OPS][N_PHASES]
    long calls[N_OPS][N_PHASES]


cdef inline double prof_start(Profile* pr) noexcept nogil:
    return openmp.omp_get_wtime() if pr.on else 0.0


cdef inline double prof_mark(Profile* pr, int op, int phase, double t0,
                             double flops) noexcept nogil:
    # Charge the time since t0 to (op, phase); returns now, the next op's t0.
    cdef double t
    if not pr.on:
        return 0.0
    t = openmp.omp_get_wtime()
    pr.seconds[op][phase] += t - t0
    pr.flops[op][phase] += flops
    pr.calls[op][phase] += 1
    return t


cdef void prof_reset(Profile* pr) noexcept nogil:
    cdef int op, ph
    for op in range(N_OPS):
        for ph in range(N_PHASES):
            pr.seconds[op][ph] = 0.0
            pr.flops[op][ph] = 0.0
            pr.calls[op][ph] = 0


cdef list prof_report(Profile* pr):
    cdef int op, ph
    out = []
    for ph in range(N_PHASES):
        for op in range(N_OPS):
            if pr.calls[op][ph]:
                out.append({"op": OP_NAMES[op], "phase": PHASE_NAMES[ph],
                            "seconds": pr.seconds[op][ph], "flops": pr.flops[op][ph],
                            "calls": pr.calls[op][ph]})
    return out


def py_wtime():
    """omp_get_wtime(): the clock the profile uses (femtogpt/train/optim.py)."""
    return openmp.omp_get_wtime()
