/* q8 GEMM: fp16 scales, the sizes of the packed operands, packing the
 * weight, quantizing activation rows, and unpacking (for tests). Shared by
 * every path, so all of them read the same bytes.
 * Part of gemm_q8.h (which includes it after its constants and system headers; not for use alone).
 */
#ifndef FEMTOGPT_GEMM_Q8_QUANT_H
#define FEMTOGPT_GEMM_Q8_QUANT_H

/* ------------------------------------------------------------------------
 * fp16 scales (plain C: the packer runs once per weight, the F16C
 * instructions are not in the baseline build, and both paths must see the
 * same value; fp16 -> fp32 is exact, so vcvtph2ps agrees with it bit for bit)
 * ------------------------------------------------------------------------ */

static inline uint32_t gemm_q8_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float gemm_q8_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* float32 -> fp16, round to nearest, ties to even (numpy's astype(float16)).
 * Normal results: adding 0xfff plus the lowest kept bit carries into the
 * kept bits exactly above the tie or at a tie with an odd kept bit.
 * Subnormal results: |f| * 2^24 is the value in units of the smallest fp16
 * subnormal (exact: a power of two), rounded to an integer by the 2^23 trick
 * (default rounding mode: nearest even); 1024 lands on the smallest normal. */
static inline uint16_t gemm_q8_f16_from_f32(float f)
{
    uint32_t x = gemm_q8_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u)
        return sign | 0x7e00u;                      /* NaN */
    if (x >= 0x477ff000u)
        return sign | 0x7c00u;                      /* >= 65520: inf */
    if (x < 0x38800000u) {                          /* below 2^-14: subnormal or zero */
        volatile float h = gemm_q8_float(x) * 16777216.0f;  /* volatile: no fma, no folding */
        float r = (h + 8388608.0f) - 8388608.0f;
        return sign | (uint16_t)r;
    }
    return sign | (uint16_t)(((x + 0xfffu + ((x >> 13) & 1u)) >> 13) - (112u << 10));
}

/* fp16 -> float32, exact. */
static inline float gemm_q8_f32_from_f16(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);  /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31)
        return gemm_q8_float(sign | 0x7f800000u | (m << 13));
    return gemm_q8_float(sign | ((e + 112u) << 23) | (m << 13));
}

/* Round to nearest even, for |y| <= 127 (callers clamp first): y + 1.5 * 2^23
 * lies in [2^23, 2^24), where float32's spacing is 1, so the add rounds y
 * to an integer by the default mode and the subtraction is exact. (2^23
 * alone would not do for negative y: below 2^23 the spacing is 1/2.)
 * Plain float ops, so gcc vectorises the loops that call it. */
static inline float gemm_q8_rne(float y)
{
    return (y + 12582912.0f) - 12582912.0f;
}

/* q = round(v / d) clamped to [-127, 127]; 0 when d == 0. The clamp is on
 * the quotient (fmaxf/fminf: a NaN quotient becomes -127, not undefined). */
static inline int gemm_q8_quant(float v, float d)
{
    if (d == 0.0f)
        return 0;
    float y = v / d;
    y = y > 127.0f ? 127.0f : y;
    y = y < -127.0f ? -127.0f : y;
    return (int)gemm_q8_rne(y);
}

/* ------------------------------------------------------------------------
 * Sizes
 * ------------------------------------------------------------------------ */

static inline int gemm_q8_blocks(int K) { return (K + GEMM_Q8_QK - 1) / GEMM_Q8_QK; }
static inline int gemm_q8_panels(int N) { return (N + GEMM_Q8_NR - 1) / GEMM_Q8_NR; }

/* Bytes of one packed panel: ceil(blocks / 2) block pairs of 1088 bytes. */
static inline size_t gemm_q8_panel_bytes(int K)
{
    return (size_t)((gemm_q8_blocks(K) + 1) / 2) * GEMM_Q8_PAIR_BYTES;
}

/* Bytes of a packed weight of N x K (a multiple of 64). */
GEMM_Q8_API size_t gemm_q8_weight_bytes(int N, int K)
{
    if (N <= 0 || K <= 0)
        return 0;
    return (size_t)gemm_q8_panels(N) * gemm_q8_panel_bytes(K);
}

/* Bytes of one quantized activation row (a multiple of 64): K rounded up to
 * blocks of int8, then a float scale and an int32 correction per block. */
GEMM_Q8_API size_t gemm_q8_row_bytes(int K)
{
    size_t kb = (size_t)gemm_q8_blocks(K);
    return (kb * GEMM_Q8_QK + kb * 8 + 63) / 64 * 64;
}

static inline void* gemm_q8_align64(void* p)
{
    return (void*)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* Where block b of a panel's quants and scales are. */
static inline const uint8_t* gemm_q8_block_q(const uint8_t* panel, int b)
{
    return panel + (size_t)(b >> 1) * GEMM_Q8_PAIR_BYTES + (size_t)(b & 1) * GEMM_Q8_BLOCK_Q;
}
static inline const uint16_t* gemm_q8_block_d(const uint8_t* panel, int b)
{
    return (const uint16_t*)(panel + (size_t)(b >> 1) * GEMM_Q8_PAIR_BYTES + 2 * GEMM_Q8_BLOCK_Q
                             + (size_t)(b & 1) * GEMM_Q8_NR * 2);
}

/* ------------------------------------------------------------------------
 * The weight
 * ------------------------------------------------------------------------ */

/* One block of one weight row: its fp16 scale, and q + 128 of its (up to)
 * 32 values into dst[4 * NR * (k / 4) + k % 4] (the column's 4-byte slots,
 * one per group of 4 k). Values past K are zero: q = 0, stored as 128. */
static inline uint16_t gemm_q8_pack_block(uint8_t* dst, const float* w, int len)
{
    float amax = 0.0f;
    for (int k = 0; k < len; k++) {
        float a = fabsf(w[k]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f;
    d = d > 65504.0f ? 65504.0f : d;                /* the largest finite fp16 */
    uint16_t dh = gemm_q8_f16_from_f32(d);
    float df = gemm_q8_f32_from_f16(dh);            /* q is computed with the scale the sums use */
    for (int k = 0; k < GEMM_Q8_QK; k++) {
        int q = k < len ? gemm_q8_quant(w[k], df) : 0;
        dst[(k >> 2) * (4 * GEMM_Q8_NR) + (k & 3)] = (uint8_t)(q + 128);
    }
    return dh;
}

/* Pack panels p0 .. p1-1 of W (N x K, row-major: rows are output columns)
 * into `data` (gemm_q8_weight_bytes(N, K) bytes). Panels are independent, so
 * threads may pack disjoint ranges of one weight at once. Columns past N get
 * q = 0 and scale 0. */
GEMM_Q8_API void gemm_q8_pack_panels(uint8_t* data, const float* W, int N, int K, int p0, int p1)
{
    int nb = gemm_q8_blocks(K);
    size_t pbytes = gemm_q8_panel_bytes(K);
    for (int p = p0; p < p1; p++) {
        uint8_t* panel = data + (size_t)p * pbytes;
        memset(panel, 0, pbytes);                   /* the odd block's pair half and scales past N */
        for (int b = 0; b < nb; b++) {
            uint8_t* q = (uint8_t*)gemm_q8_block_q(panel, b);
            uint16_t* d = (uint16_t*)gemm_q8_block_d(panel, b);
            int k0 = b * GEMM_Q8_QK;
            int len = K - k0 < GEMM_Q8_QK ? K - k0 : GEMM_Q8_QK;
            for (int c = 0; c < GEMM_Q8_NR; c++) {
                int n = p * GEMM_Q8_NR + c;
                if (n < N) {
                    d[c] = gemm_q8_pack_block(q + 4 * c, W + (size_t)n * K + k0, len);
                } else {
                    d[c] = 0;
                    for (int k = 0; k < GEMM_Q8_QK; k++)
                        q[4 * c + (k >> 2) * (4 * GEMM_Q8_NR) + (k & 3)] = 128;
                }
            }
        }
    }
}

/* W (N x K) = the packed weight's values, q * scale (exact in float32). */
GEMM_Q8_API void gemm_q8_dequantize(float* W, const uint8_t* data, int N, int K)
{
    size_t pbytes = gemm_q8_panel_bytes(K);
    for (int n = 0; n < N; n++) {
        const uint8_t* panel = data + (size_t)(n / GEMM_Q8_NR) * pbytes;
        int c = n % GEMM_Q8_NR;
        for (int k = 0; k < K; k++) {
            int b = k / GEMM_Q8_QK, kk = k % GEMM_Q8_QK;
            int q = (int)gemm_q8_block_q(panel, b)[(kk >> 2) * (4 * GEMM_Q8_NR) + 4 * c + (kk & 3)] - 128;
            W[(size_t)n * K + k] = (float)q * gemm_q8_f32_from_f16(gemm_q8_block_d(panel, b)[c]);
        }
    }
}

/* ------------------------------------------------------------------------
 * Activations
 * ------------------------------------------------------------------------ */

/* Quantize rows m0 .. m1-1 of x (rows of K) into `act`, row m at
 * act + m * gemm_q8_row_bytes(K): Kb * 32 int8 q (zeros past K), then Kb
 * float scales d = amax / 127 (not rounded to fp16), then Kb int32
 * corrections -128 * sum(q) over the block (the weights are stored as
 * q + 128; this takes the 128 back out of each block's integer sum). One
 * rule for every path: the kernels only read what this writes. */
GEMM_Q8_API void gemm_q8_quantize_rows(uint8_t* act, const float* x, int K, ptrdiff_t m0, ptrdiff_t m1)
{
    int nb = gemm_q8_blocks(K);
    size_t rb = gemm_q8_row_bytes(K);
    for (ptrdiff_t m = m0; m < m1; m++) {
        int8_t* q = (int8_t*)(act + (size_t)m * rb);
        float* dx = (float*)(q + (size_t)nb * GEMM_Q8_QK);
        int32_t* cx = (int32_t*)(dx + nb);
        const float* row = x + (size_t)m * K;
        for (int b = 0; b < nb; b++) {
            int k0 = b * GEMM_Q8_QK;
            int len = K - k0 < GEMM_Q8_QK ? K - k0 : GEMM_Q8_QK;
            float v[GEMM_Q8_QK];
            for (int k = 0; k < GEMM_Q8_QK; k++)
                v[k] = k < len ? row[k0 + k] : 0.0f;
            float amax = 0.0f;
            for (int k = 0; k < GEMM_Q8_QK; k++) {
                float a = fabsf(v[k]);
                amax = a > amax ? a : amax;
            }
            float d = amax / 127.0f;
            int32_t sum = 0;
            for (int k = 0; k < GEMM_Q8_QK; k++) {
                int qk = gemm_q8_quant(v[k], d);
                q[k0 + k] = (int8_t)qk;
                sum += qk;
            }
            dx[b] = d;
            cx[b] = -128 * sum;
        }
    }
}

#endif /* FEMTOGPT_GEMM_Q8_QUANT_H */
