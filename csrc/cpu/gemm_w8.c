/*
 * Linear layer with 8-bit weights and float32 scales, for few rows of input (decode
 * steps): the weight is read once, as bytes, and widened in registers.
 *
 *   y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * code[n, k]  (+ bias[n])
 *
 * x: [M, K] rows of stride ldx in float32, bfloat16 or float16; codes: [N, K] row-major,
 * int8 or float8 E4M3; scale: [N, G] float32, G equal groups of K / G columns; bias: [N]
 * in x's dtype or NULL; y: [M, N] rows of stride ldy in x's dtype. Products are summed in
 * float32 and rounded once to the dtype.
 *
 * An E4M3 byte becomes a float16 by moving its exponent and mantissa fields into the
 * float16's (sign << 8, the other seven bits << 7): the value is the E4M3 value / 2^8
 * exactly, subnormals included, and a float16 widens to float32 in one instruction. The
 * 2^8 is folded into the group's scale.
 *
 * Threads split the output columns (weight rows); each takes MR input rows at a time, so
 * a weight row is read from memory once for every MR rows of x, and keeps per-group
 * partial sums in vector registers, scaled once per group.
 */
#include "cpu_types.h"

enum { CODE_INT8 = 0, CODE_FP8_E4M3 = 1 };
enum { MR = 4 };

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#else
#define HAVE_AVX2_PATH 0
#endif

static inline float widen1(uint8_t v, int code) {
    if (code == CODE_INT8) return (float)(int8_t)v;
    return f16_to_f32((uint16_t)(((v & 0x80) << 8) | ((v & 0x7f) << 7)));
}

/* Scale per group, with E4M3's 2^8 folded in. */
static inline float group_scale(const float *scale, int64_t i, int code) {
    return code == CODE_FP8_E4M3 ? scale[i] * 256.0f : scale[i];
}

/* The portable path: one output at a time. */
static void w8_columns_scalar(float *out, const float *xf, int64_t K, int rows,
                              const uint8_t *codes, const float *scale, int64_t G, int64_t n0,
                              int64_t n1, int code) {
    const int64_t gk = K / G;
    for (int64_t n = n0; n < n1; n++)
        for (int i = 0; i < rows; i++) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                float acc = 0.0f;
                for (int64_t k = g * gk; k < (g + 1) * gk; k++)
                    acc += xf[i * K + k] * widen1(codes[n * K + k], code);
                total += acc * group_scale(scale, n * G + g, code);
            }
            out[i * (n1 - n0) + (n - n0)] = total;
        }
}

#if HAVE_AVX2_PATH
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline)) AVX2_TARGET

/* Eight codes as float32: int8 exactly; E4M3 as value / 2^8 (see above). */
AVX2_INLINE __m256 widen8(const uint8_t *p, const int code) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    if (code == CODE_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m128i b = _mm_cvtepu8_epi16(bytes);
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
    return _mm256_cvtph_ps(h);
}

AVX2_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Rows [0, rows) of this m-block at columns [n0, n1); rows and code constant after
 * inlining, so the accumulators live in registers. */
AVX2_INLINE void w8_columns_avx2(float *out, const float *xf, int64_t K, const int rows,
                                 const uint8_t *codes, const float *scale, int64_t G,
                                 int64_t n0, int64_t n1, const int code) {
    const int64_t gk = K / G, vk = gk / 8 * 8;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = codes + n * K;
        __m256 total[MR];
        float tail[MR];
        for (int i = 0; i < rows; i++) total[i] = _mm256_setzero_ps(), tail[i] = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[MR];
            float acc1[MR];
            for (int i = 0; i < rows; i++) acc[i] = _mm256_setzero_ps(), acc1[i] = 0.0f;
            const int64_t k0 = g * gk;
            for (int64_t k = k0; k < k0 + vk; k += 8) {
                const __m256 wv = widen8(w + k, code);
                for (int i = 0; i < rows; i++)
                    acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + i * K + k), wv, acc[i]);
            }
            for (int64_t k = k0 + vk; k < k0 + gk; k++) {
                const float wk = widen1(w[k], code);
                for (int i = 0; i < rows; i++) acc1[i] += xf[i * K + k] * wk;
            }
            const float s = group_scale(scale, n * G + g, code);
            for (int i = 0; i < rows; i++) {
                total[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(s), total[i]);
                tail[i] += acc1[i] * s;
            }
        }
        for (int i = 0; i < rows; i++)
            out[i * (n1 - n0) + (n - n0)] = hsum256(total[i]) + tail[i];
    }
}

#define W8_CASE(r, c) w8_columns_avx2(out, xf, K, r, codes, scale, G, n0, n1, c)

AVX2_TARGET static void w8_columns_avx2_any(float *out, const float *xf, int64_t K, int rows,
                                            const uint8_t *codes, const float *scale,
                                            int64_t G, int64_t n0, int64_t n1, int code) {
    if (code == CODE_INT8) {
        if (rows == 4) W8_CASE(4, CODE_INT8);
        else if (rows == 3) W8_CASE(3, CODE_INT8);
        else if (rows == 2) W8_CASE(2, CODE_INT8);
        else W8_CASE(1, CODE_INT8);
    } else {
        if (rows == 4) W8_CASE(4, CODE_FP8_E4M3);
        else if (rows == 3) W8_CASE(3, CODE_FP8_E4M3);
        else if (rows == 2) W8_CASE(2, CODE_FP8_E4M3);
        else W8_CASE(1, CODE_FP8_E4M3);
    }
}
#endif

/* Whether this CPU runs the AVX2 path; VLLM_CPU_W8_AVX2=0 forces the portable one (read
 * once per process; the tests use it to check that path here). */
static int use_avx2(void) {
#if HAVE_AVX2_PATH
    static int cached = -1;
    if (cached < 0) {
        const char *env = getenv("VLLM_CPU_W8_AVX2");
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c") && !(env && env[0] == '0');
    }
    return cached;
#else
    return 0;
#endif
}

static void w8_columns(float *out, const float *xf, int64_t K, int rows, const uint8_t *codes,
                       const float *scale, int64_t G, int64_t n0, int64_t n1, int code) {
#if HAVE_AVX2_PATH
    if (use_avx2()) {
        w8_columns_avx2_any(out, xf, K, rows, codes, scale, G, n0, n1, code);
        return;
    }
#endif
    w8_columns_scalar(out, xf, K, rows, codes, scale, G, n0, n1, code);
}

/* w8_linear(y, x, codes, scale, bias_or_0, M, N, K, G, ldy, ldx, code, dtype, threads) */
PyObject *vllm_w8_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long y, x, codes, scale, bias;
    int64_t M, N, K, G, ldy, ldx;
    int code, dtype, num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLiii", &y, &x, &codes, &scale, &bias, &M, &N, &K,
                          &G, &ldy, &ldx, &code, &dtype, &num_threads))
        return NULL;
    if (M < 0 || N <= 0 || K <= 0 || G <= 0 || K % G || ldy < N || (M > 1 && ldx < K) ||
        (code != CODE_INT8 && code != CODE_FP8_E4M3) || dtype < DTYPE_F32 || dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "w8_linear: invalid sizes, code or dtype");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    const int esize = dtype_size(dtype);
    /* x widened to float32, and each thread's float32 outputs before rounding. */
    float *xf = malloc((size_t)(M * K + M * N) * sizeof(float) + 32);
    if (!xf) return PyErr_NoMemory();
    float *yf = xf + M * K;
    const int nt = threads_for(N * K, num_threads);
    Py_BEGIN_ALLOW_THREADS;
    for (int64_t m = 0; m < M; m++)
        load_f32(xf + m * K, (const char *)PTR(x) + m * ldx * esize, K, dtype);
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        thread_share(N, &begin, &end);
        for (int64_t m = 0; m < M && begin < end; m += MR) {
            const int rows = M - m < MR ? (int)(M - m) : MR;
            float *out = yf + m * N + begin * rows; /* rows x (end - begin), this thread's */
            w8_columns(out, xf + m * K, K, rows, (const uint8_t *)PTR(codes),
                       (const float *)PTR(scale), G, begin, end, code);
            for (int i = 0; i < rows; i++) {
                float *row = out + i * (end - begin);
                if (bias)
                    for (int64_t n = begin; n < end; n++) {
                        float b;
                        load_f32(&b, (const char *)PTR(bias) + n * esize, 1, dtype);
                        row[n - begin] += b;
                    }
                store_f32((char *)PTR(y) + ((m + i) * ldy + begin) * esize, row, end - begin,
                          dtype);
            }
        }
    }
    Py_END_ALLOW_THREADS;
    free(xf);
    Py_RETURN_NONE;
}
