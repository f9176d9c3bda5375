/*
 * Shared by the CPU kernels of vllm._C: storage dtypes and their float32 conversions,
 * an eight-float vector type, a vectorised exp, and the OpenMP and multiversioning
 * helpers. No torch headers: vllm/_custom_ops.py checks tensors and passes pointers.
 */
#ifndef VLLM_CPU_TYPES_H
#define VLLM_CPU_TYPES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Codes passed from Python (vllm/_custom_ops.py: _DTYPE_CODES). */
enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

static inline int dtype_size(int dtype) { return dtype == DTYPE_F32 ? 4 : 2; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN kept quiet: what torch's float -> bfloat16 cast does. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}

/* n elements of a storage dtype <-> float32. */
static inline void load_f32(float *dst, const void *src, int64_t n, int dtype) {
    const uint16_t *s = (const uint16_t *)src;
    if (dtype == DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == DTYPE_BF16) {
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
    }
}

static inline void store_f32(void *dst, const float *src, int64_t n, int dtype) {
    uint16_t *d = (uint16_t *)dst;
    if (dtype == DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == DTYPE_BF16) {
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_f16(src[i]);
    }
}

/* Round float32 values to the storage dtype and back, as an op computed in float32 and
 * stored in that dtype does in torch (identity for float32). */
static inline void round_to(float *x, int64_t n, int dtype) {
    if (dtype == DTYPE_BF16) {
        for (int64_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
    } else if (dtype == DTYPE_F16) {
        for (int64_t i = 0; i < n; i++) x[i] = f16_to_f32(f32_to_f16(x[i]));
    }
}

/* Eight floats; GCC/Clang lower it to one AVX register or two SSE ones. aligned(4)
 * makes loads and stores through it unaligned-safe.
 *
 * Functions taking or returning v8f must be inlined (VEC_INLINE): the kernels are built
 * twice (MULTIVERSION, below), and a call between an AVX clone and an out-of-line
 * baseline helper would pass the vector in a ymm register on one side and in memory on
 * the other (GCC's -Wpsabi warning; it crashed). */
#define VEC_INLINE static inline __attribute__((always_inline))
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

typedef uint32_t v8u __attribute__((vector_size(32), aligned(2)));
typedef uint16_t v8us __attribute__((vector_size(16), aligned(2)));
typedef _Float16 v8h __attribute__((vector_size(16), aligned(2)));

VEC_INLINE v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* Eight elements of a float32, bfloat16 or float16 array as float32. */
VEC_INLINE v8f load8_f32(const void *p, int dtype) {
    if (dtype == DTYPE_F32) return *(const v8f *)p;
    if (dtype == DTYPE_BF16) return (v8f)(__builtin_convertvector(*(const v8us *)p, v8u) << 16);
    return __builtin_convertvector(*(const v8h *)p, v8f);
}

VEC_INLINE float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* Lane-wise max; where either lane is NaN the result is b. */
VEC_INLINE v8f vmax(v8f a, v8f b) { return (v8f)(((v8i)a & (a > b)) | ((v8i)b & ~(a > b))); }

/* x clamped to [lo, hi]; NaN lanes stay NaN. */
VEC_INLINE v8f vclamp(v8f x, float lo, float hi) {
    const v8i below = x < splat(lo), above = x > splat(hi);
    x = (v8f)(((v8i)x & ~below) | ((v8i)splat(lo) & below));
    return (v8f)(((v8i)x & ~above) | ((v8i)splat(hi) & above));
}

/* exp(x), relative error below 1e-6 over [-87, 88] (clamped outside; NaN stays NaN):
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial, 2^n
 * through the exponent bits. */
VEC_INLINE v8f exp_v8(v8f x) {
    x = vclamp(x, -87.0f, 88.0f);
    const v8f t = x * 1.44269504088896341f;
    const v8i n = __builtin_convertvector(t + (v8f)(((v8i)splat(0.5f)) | ((v8i)t & (v8i)splat(-0.0f))), v8i);
    const v8f nf = __builtin_convertvector(n, v8f);
    const v8f r = x - nf * 0.693145751953125f - nf * 1.42860682030941723e-6f;
    v8f p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const v8i bits = (n + 127) << 23;
    v8f two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* x86-64-v3 (AVX2 + FMA) and baseline versions of a function, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* Threads for a loop over `work` elements: one below ~64k (a parallel region costs more
 * than it saves there), else at most what torch uses. Run on torch's OpenMP pool: this
 * module links libgomp.so.1, which resolves to the runtime torch has already loaded. */
static inline int threads_for(int64_t work, int num_threads) {
    if (work < (1 << 16) || num_threads < 1) return 1;
    return num_threads;
}

/* The calling thread's share [begin, end) of `items`, split evenly over the threads of
 * the enclosing OpenMP parallel region (all of it outside one). */
static inline void thread_share(int64_t items, int64_t *begin, int64_t *end) {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int64_t tid = 0, n = 1;
#endif
    *begin = items * tid / n;
    *end = items * (tid + 1) / n;
}

/* Pointer arguments arrive as Python ints (tensor.data_ptr()). The kernels are built
 * with -fopenmp (setup.py); without it their `omp parallel` pragmas are ignored. */
#define PTR(x) ((void *)(uintptr_t)(x))

/* Entry points, one per kernel file; the method table is in module.c. */
PyObject *vllm_paged_attention_decode(PyObject *self, PyObject *args);
PyObject *vllm_rms_norm(PyObject *self, PyObject *args);
PyObject *vllm_silu_and_mul(PyObject *self, PyObject *args);
PyObject *vllm_rotary_embedding(PyObject *self, PyObject *args);
PyObject *vllm_reshape_and_cache(PyObject *self, PyObject *args);
PyObject *vllm_argmax_logsumexp(PyObject *self, PyObject *args);
PyObject *vllm_lowp_linear(PyObject *self, PyObject *args);
PyObject *vllm_w8_linear(PyObject *self, PyObject *args);

#endif
