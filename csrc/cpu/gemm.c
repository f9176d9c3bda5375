/*
 * Linear layer with 16-bit weights computed in float32, for CPUs without native
 * bfloat16 / float16 GEMMs (no AVX512-BF16, AMX or AVX512-FP16): there torch emulates
 * them at about a third of its float32 speed, while this kernel streams the 16-bit
 * weight (half float32's bytes) and widens it in registers.
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])
 *
 * x: [M, K] rows of stride ldx, w: [N, K] row-major (the checkpoint's layout, so a
 * mapped sharded_state weight is used in place), bias: [N] or NULL, y: [M, N] rows of
 * stride ldy; all in one dtype (bfloat16 or float16). Products are summed in float32 and
 * rounded once to the dtype, as torch's CPU GEMM does for these dtypes, so results
 * match it up to the order of the float32 sums.
 *
 * Layout of the work: x is widened once into a float32 buffer, in tiles of MR rows laid
 * out block by block of k so that a tile is read sequentially. Each thread owns a range
 * of output columns (weight rows), so the weight is read from memory once per pass over
 * MC rows of x. The micro-kernel takes a tile of x and NR rows of w and keeps MR x NR
 * vector accumulators of partial dot products over k, summed across lanes at the end.
 * Keeping the weight row-major costs these lane sums (about 3 instructions per
 * output); a layout packed for the GEMM would not be the checkpoint's any more.
 *
 * The linear layers call this for few rows (decode steps) only: from
 * LOWP_WIDEN_MIN_ROWS rows on (vllm/model_executor/layers/linear.py) a widened float32
 * copy of the weight through torch's float32 GEMM is faster.
 *
 * A bfloat16 vector load of 2*VW weights is widened without a shuffle: shifting each
 * 32-bit lane left by 16 gives the even-indexed weights as float32, masking the low 16
 * bits gives the odd-indexed ones. The widened x stores each block of 2*VW values as its
 * VW even ones followed by its VW odd ones, so both line up with plain loads.
 */
#include "cpu_types.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#else
#define HAVE_AVX512_PATH 0
#endif

enum {
    MC = 128, /* rows of x per pass over the weights: 128 x K floats stay in L2 */
    NG = 8,   /* micro-tiles of weight rows per group: read from memory for the first tile
                 of x rows, from L2 for the others, while each tile of x stays in L1 */
};

/* Elements of k per block of the widened x: 2 * vector width for bfloat16 (even, odd
 * halves), the vector width for float16. */
static inline int64_t block_k(int dtype, int vw) { return dtype == DTYPE_BF16 ? 2 * vw : vw; }

static inline float widen_any(uint16_t v, int dtype) {
    return dtype == DTYPE_BF16 ? bf16_to_f32(v) : f16_to_f32(v);
}

/* Rows [m0, m1) of x (m0 a multiple of mr) widened to float32 into xf, in tiles of mr
 * rows (mr * K floats each): first the K / bk full blocks of k, each as [mr][bk] (for
 * bfloat16 a row's bk values reordered evens then odds), then the K % bk tail as
 * [mr][tail] in order. Rows past M in the last tile are zero. */
static void widen_rows(float *xf, const uint16_t *x, int64_t ldx, int64_t m0, int64_t m1,
                       int64_t M, int64_t K, int mr, int64_t bk, int dtype) {
    const int64_t nb = K / bk, kfull = nb * bk, tail = K - kfull, half = bk / 2;
    for (int64_t m = m0; m < m1; m++) {
        float *tile = xf + (m / mr) * mr * K;
        const int64_t r = m % mr;
        if (m >= M) {
            for (int64_t b = 0; b < nb; b++) memset(tile + (b * mr + r) * bk, 0, bk * sizeof(float));
            memset(tile + kfull * mr + r * tail, 0, tail * sizeof(float));
            continue;
        }
        const uint16_t *xr = x + m * ldx;
        for (int64_t b = 0; b < nb; b++) {
            float *dst = tile + (b * mr + r) * bk;
            const uint16_t *src = xr + b * bk;
            if (dtype == DTYPE_BF16)
                for (int64_t i = 0; i < half; i++) {
                    dst[i] = bf16_to_f32(src[2 * i]);
                    dst[half + i] = bf16_to_f32(src[2 * i + 1]);
                }
            else
                load_f32(dst, src, bk, DTYPE_F16);
        }
        float *dst = tile + kfull * mr + r * tail;
        load_f32(dst, xr + kfull, tail, dtype);
    }
}

static inline uint16_t narrow(float v, int dtype) {
    return dtype == DTYPE_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

/* ---- AVX-512: MR x NR = 8 x 3 accumulators of 16 floats ------------------------- */
#if HAVE_AVX512_PATH
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#define AVX512_INLINE static inline __attribute__((always_inline)) AVX512_TARGET

enum { MR16 = 8, NR16 = 3 };

/* Load x once per vector for the NR16 FMAs that use it: left alone GCC folds the load
 * into each FMA, and the load ports, not the FMA units, then bound the loop. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))

/* [sum of v[0]'s lanes, ..., sum of v[7]'s lanes]: 24 shuffles and adds for 8 sums. */
AVX512_INLINE __m256 lane_sums8(const __m512 v[8]) {
    __m512 t[4], u[2];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) /* per 128-bit lane: [v0 02, v1 02, v0 13, v1 13] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) { /* per 128-bit lane: [v0, v1, v2, v3] */
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* lanes [u0 0+1, u0 2+3, u1 0+1, u1 2+3], then [u0 all, u1 all] */
    const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                   _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    return _mm512_castps512_ps256(
        _mm512_add_ps(_mm512_shuffle_f32x4(w, w, 0x08), _mm512_shuffle_f32x4(w, w, 0x0d)));
}

/* out[j][i] = sum over the first nb blocks of k of x[i, k] * w[j, k]; xt is a tile of
 * the widened x (blocks of [MR16][bk]). With ahead > 0 it also prefetches the rows
 * `ahead` further down the weight (the next group) over the same k: a prefetch never
 * faults, so past the weight's end it is only wasted. */
AVX512_INLINE void micro16(float out[NR16][MR16], const float *xt, const uint16_t *w,
                           int64_t ldw, int64_t nb, int64_t ahead, const int nr, const int dtype) {
    __m512 acc[MR16][NR16];
#pragma GCC unroll 8
    for (int i = 0; i < MR16; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR16; j++) acc[i][j] = _mm512_setzero_ps();
    if (dtype == DTYPE_BF16) {
        const __m512i low_half = _mm512_set1_epi32(0xffff);
        for (int64_t b = 0; b < nb; b++) {
            const uint16_t *wb = w + b * 32;
            const float *xb = xt + b * MR16 * 32;
            if (ahead)
#pragma GCC unroll 3
                for (int j = 0; j < nr; j++)
                    _mm_prefetch((const char *)(wb + (ahead + j) * ldw), _MM_HINT_T0);
            __m512 wv[NR16];
#pragma GCC unroll 3
            for (int j = 0; j < nr; j++)
                wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(wb + j * ldw), 16));
#pragma GCC unroll 8
            for (int i = 0; i < MR16; i++) {
                __m512 xv = _mm512_load_ps(xb + i * 32);
                KEEP_IN_REGISTER(xv);
#pragma GCC unroll 3
                for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
            }
#pragma GCC unroll 3
            for (int j = 0; j < nr; j++)
                wv[j] = _mm512_castsi512_ps(
                    _mm512_andnot_si512(low_half, _mm512_loadu_si512(wb + j * ldw)));
#pragma GCC unroll 8
            for (int i = 0; i < MR16; i++) {
                __m512 xv = _mm512_load_ps(xb + i * 32 + 16);
                KEEP_IN_REGISTER(xv);
#pragma GCC unroll 3
                for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    } else {
        for (int64_t b = 0; b < nb; b++) {
            __m512 wv[NR16];
            if (ahead)
#pragma GCC unroll 3
                for (int j = 0; j < nr; j++)
                    _mm_prefetch((const char *)(w + (ahead + j) * ldw + b * 16), _MM_HINT_T0);
#pragma GCC unroll 3
            for (int j = 0; j < nr; j++)
                wv[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + j * ldw + b * 16)));
#pragma GCC unroll 8
            for (int i = 0; i < MR16; i++) {
                __m512 xv = _mm512_load_ps(xt + (b * MR16 + i) * 16);
                KEEP_IN_REGISTER(xv);
#pragma GCC unroll 3
                for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    }
#pragma GCC unroll 3
    for (int j = 0; j < nr; j++) {
        __m512 col[MR16];
#pragma GCC unroll 8
        for (int i = 0; i < MR16; i++) col[i] = acc[i][j];
        _mm256_storeu_ps(out[j], lane_sums8(col));
    }
}

AVX512_TARGET static void micro16_any(float out[NR16][MR16], const float *xt,
                                      const uint16_t *w, int64_t ldw, int64_t nb, int64_t ahead,
                                      int nr, int dtype) {
    if (dtype == DTYPE_BF16) {
        if (nr == 3) micro16(out, xt, w, ldw, nb, ahead, 3, DTYPE_BF16);
        else if (nr == 2) micro16(out, xt, w, ldw, nb, ahead, 2, DTYPE_BF16);
        else micro16(out, xt, w, ldw, nb, ahead, 1, DTYPE_BF16);
    } else {
        if (nr == 3) micro16(out, xt, w, ldw, nb, ahead, 3, DTYPE_F16);
        else if (nr == 2) micro16(out, xt, w, ldw, nb, ahead, 2, DTYPE_F16);
        else micro16(out, xt, w, ldw, nb, ahead, 1, DTYPE_F16);
    }
}

/* h[j][i] = out[j][i] rounded to the dtype (to nearest even; NaN stays NaN), j < nr. */
AVX512_TARGET static void narrow16(uint16_t h[3][8], float out[NR16][MR16], int nr, int dtype) {
    for (int j = 0; j < nr; j++) {
        const __m256 r = _mm256_loadu_ps(out[j]);
        __m128i v;
        if (dtype == DTYPE_BF16) {
            const __m256i u = _mm256_castps_si256(r);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            __m256i b = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
            const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
            b = _mm256_mask_mov_epi32(b, _mm256_cmp_ps_mask(r, r, _CMP_UNORD_Q), quiet);
            v = _mm256_cvtepi32_epi16(b);
        } else {
            v = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        _mm_storeu_si128((__m128i *)h[j], v);
    }
}
#endif

/* ---- Portable path (AVX2 clone where available): MR x NR = 4 x 2 of 8 floats ----- */
enum { MR8 = 4, NR8 = 2 };

MULTIVERSION static void micro8_any(float out[NR8][MR8], const float *xt, const uint16_t *w,
                                    int64_t ldw, int64_t nb, int nr, int dtype) {
    v8f acc[MR8][NR8] = {{{0}}};
    for (int64_t b = 0; b < nb; b++) {
        v8f lo[NR8], hi[NR8];
        for (int j = 0; j < NR8; j++) {
            const int jj = j < nr ? j : 0; /* a missing row repeats row 0, then is dropped */
            if (dtype == DTYPE_BF16) {
                v8u wi;
                memcpy(&wi, w + jj * ldw + b * 16, sizeof wi);
                lo[j] = (v8f)(wi << 16);
                hi[j] = (v8f)(wi & 0xffff0000u);
            } else {
                lo[j] = load8_f32(w + jj * ldw + b * 8, DTYPE_F16);
            }
        }
        for (int i = 0; i < MR8; i++) {
            const float *xb = xt + (b * MR8 + i) * block_k(dtype, 8);
            const v8f x0 = *(const v8f *)xb;
            for (int j = 0; j < NR8; j++) acc[i][j] += x0 * lo[j];
            if (dtype == DTYPE_BF16) {
                const v8f x1 = *(const v8f *)(xb + 8);
                for (int j = 0; j < NR8; j++) acc[i][j] += x1 * hi[j];
            }
        }
    }
    for (int i = 0; i < MR8; i++)
        for (int j = 0; j < nr; j++) out[j][i] = hsum(acc[i][j]);
}

/* The calling thread's columns [n0, n1) for rows [0, M) of the widened x. */
static void gemm_columns(uint16_t *y, int64_t ldy, const float *xf, int64_t M, int64_t K,
                         const uint16_t *w, int64_t ldw, const uint16_t *bias, int64_t n0,
                         int64_t n1, int dtype, int wide) {
    const int mr = wide ? 8 : MR8, nrmax = wide ? 3 : NR8;
    const int64_t bk = block_k(dtype, wide ? 16 : 8), nb = K / bk, kfull = nb * bk;
    float out[3][8];
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = m0 + MC < M ? m0 + MC : M;
        for (int64_t g = n0; g < n1; g += NG * nrmax) {
            const int64_t g1 = g + NG * nrmax < n1 ? g + NG * nrmax : n1;
            for (int64_t m = m0; m < m1; m += mr) {
                const float *xm = xf + m * K;
                for (int64_t n = g; n < g1; n += nrmax) {
                    const int nr = g1 - n < nrmax ? (int)(g1 - n) : nrmax;
                    const uint16_t *wn = w + n * ldw;
#if HAVE_AVX512_PATH
                    if (wide)
                        micro16_any(out, xm, wn, ldw, nb, m == m0 ? NG * NR16 : 0, nr, dtype);
                    else
#endif
                        micro8_any((float(*)[MR8])out, xm, wn, ldw, nb, nr, dtype);
                    const int rows = M - m < mr ? (int)(M - m) : mr;
                    float(*o)[8] = out;
                    if (kfull < K || bias)
                        for (int i = 0; i < rows; i++) {
                            const float *xr = xm + kfull * mr + i * (K - kfull); /* k tail */
                            for (int j = 0; j < nr; j++) {
                                float s = 0.0f;
                                for (int64_t k = kfull; k < K; k++)
                                    s += xr[k - kfull] * widen_any(wn[j * ldw + k], dtype);
                                if (bias) s += widen_any(bias[n + j], dtype);
                                if (wide) o[j][i] += s;
                                else ((float(*)[MR8])out)[j][i] += s;
                            }
                        }
                    uint16_t h[3][8];
#if HAVE_AVX512_PATH
                    if (wide) narrow16(h, out, nr, dtype);
                    else
#endif
                        for (int j = 0; j < nr; j++)
                            for (int i = 0; i < rows; i++)
                                h[j][i] = narrow(((float(*)[MR8])out)[j][i], dtype);
                    for (int i = 0; i < rows; i++)
                        for (int j = 0; j < nr; j++) y[(m + i) * ldy + n + j] = h[j][i];
                }
            }
        }
    }
}

/* Whether this CPU runs the AVX-512 micro-kernel; VLLM_CPU_GEMM_AVX512=0 forces the
 * portable one (read once per process; the tests use it to check that path here). */
static int use_avx512(void) {
#if HAVE_AVX512_PATH
    static int cached = -1;
    if (cached < 0) {
        const char *env = getenv("VLLM_CPU_GEMM_AVX512");
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                 !(env && env[0] == '0');
    }
    return cached;
#else
    return 0;
#endif
}

/* lowp_linear(y, x, w, bias_or_0, M, N, K, ldy, ldx, ldw, dtype, num_threads) */
PyObject *vllm_lowp_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long y, x, w, bias;
    int64_t M, N, K, ldy, ldx, ldw;
    int dtype, num_threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLLLii", &y, &x, &w, &bias, &M, &N, &K, &ldy, &ldx, &ldw,
                          &dtype, &num_threads))
        return NULL;
    if (M < 0 || N <= 0 || K <= 0 || ldy < N || (M > 1 && ldx < K) || ldw < K ||
        (dtype != DTYPE_BF16 && dtype != DTYPE_F16)) {
        PyErr_SetString(PyExc_ValueError, "lowp_linear: invalid sizes or dtype");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    const int wide = use_avx512();
    const int mr = wide ? 8 : MR8, nrmax = wide ? 3 : NR8;
    const int64_t mpad = (M + mr - 1) / mr * mr; /* whole micro-tiles; pad rows are zero */
    float *xf = aligned_alloc(64, ((size_t)(mpad * K) * sizeof(float) + 63) / 64 * 64);
    if (!xf) return PyErr_NoMemory();
    const int64_t blocks = (N + nrmax - 1) / nrmax;
    const int nt = threads_for(N * K, num_threads); /* the weight read splits well */
    const int64_t bk = block_k(dtype, wide ? 16 : 8);
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        thread_share(mpad, &begin, &end);
        widen_rows(xf, (const uint16_t *)PTR(x), ldx, begin, end, M, K, mr, bk, dtype);
#pragma omp barrier
        thread_share(blocks, &begin, &end);
        const int64_t n0 = begin * nrmax, n1 = end * nrmax < N ? end * nrmax : N;
        if (n0 < n1)
            gemm_columns((uint16_t *)PTR(y), ldy, xf, M, K, (const uint16_t *)PTR(w), ldw,
                         (const uint16_t *)PTR(bias), n0, n1, dtype, wide);
    }
    Py_END_ALLOW_THREADS;
    free(xf);
    Py_RETURN_NONE;
}
