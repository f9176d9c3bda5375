/*
 * Rotary position embedding on the CPU, in place on the query and key rows (neox
 * style: the first rotary_dim dims of each head are rotated as two halves, the rest
 * pass through):
 *   x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin
 * cos_sin is a float32 table [max_position, rotary_dim]: each row holds the cos of the
 * rotary_dim / 2 frequencies, then their sin (upstream vLLM's cos_sin_cache layout).
 * For 16-bit dtypes cos and sin are rounded to the dtype and each product and sum is
 * rounded, as transformers' apply_rotary_pos_emb computes in that dtype.
 * query: [tokens, num_heads * head_size] with row stride q_stride (elements), key
 * likewise with k_stride; heads packed within a row.
 */
#include "cpu_types.h"

enum { MAX_HALF = 512 };

MULTIVERSION static void rotate_tokens(const int64_t *positions, void *query, void *key,
                                       int64_t begin, int64_t end, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_size, int64_t half,
                                       int64_t q_stride, int64_t k_stride, const float *cos_sin,
                                       int dtype) {
    const int es = dtype_size(dtype);
    float c[MAX_HALF], s[MAX_HALF], x1[MAX_HALF], x2[MAX_HALF], a[MAX_HALF], b[MAX_HALF];
    for (int64_t t = begin; t < end; t++) {
        memcpy(c, cos_sin + positions[t] * 2 * half, (size_t)half * sizeof(float));
        memcpy(s, cos_sin + positions[t] * 2 * half + half, (size_t)half * sizeof(float));
        round_to(c, half, dtype);
        round_to(s, half, dtype);
        for (int which = 0; which < 2; which++) {
            const int64_t heads = which ? num_kv_heads : num_heads;
            char *row = (char *)(which ? key : query) + (size_t)(t * (which ? k_stride : q_stride)) * es;
            for (int64_t h = 0; h < heads; h++) {
                char *p1 = row + (size_t)(h * head_size) * es, *p2 = p1 + (size_t)half * es;
                load_f32(x1, p1, half, dtype);
                load_f32(x2, p2, half, dtype);
                if (dtype == DTYPE_F32) {
                    for (int64_t i = 0; i < half; i++) {
                        a[i] = x1[i] * c[i] - x2[i] * s[i];
                        b[i] = x2[i] * c[i] + x1[i] * s[i];
                    }
                } else {
                    for (int64_t i = 0; i < half; i++) {
                        a[i] = x1[i] * c[i];
                        b[i] = x2[i] * s[i];
                    }
                    round_to(a, half, dtype);
                    round_to(b, half, dtype);
                    for (int64_t i = 0; i < half; i++) a[i] -= b[i];
                    for (int64_t i = 0; i < half; i++) {
                        b[i] = x2[i] * c[i];
                        x2[i] = x1[i] * s[i];
                    }
                    round_to(b, half, dtype);
                    round_to(x2, half, dtype);
                    for (int64_t i = 0; i < half; i++) b[i] += x2[i];
                }
                store_f32(p1, a, half, dtype);
                store_f32(p2, b, half, dtype);
            }
        }
    }
}

/* rotary_embedding(positions, query, key, tokens, num_heads, num_kv_heads, head_size,
 *                  rotary_dim, q_stride, k_stride, cos_sin, max_position, dtype,
 *                  num_threads) */
PyObject *vllm_rotary_embedding(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long positions, query, key, cos_sin;
    int64_t tokens, num_heads, num_kv_heads, head_size, rotary_dim, q_stride, k_stride, max_pos;
    int dtype, num_threads;
    if (!PyArg_ParseTuple(args, "KKKLLLLLLLKLii", &positions, &query, &key, &tokens, &num_heads,
                          &num_kv_heads, &head_size, &rotary_dim, &q_stride, &k_stride, &cos_sin,
                          &max_pos, &dtype, &num_threads))
        return NULL;
    if (tokens < 0 || num_heads < 0 || num_kv_heads < 0 || rotary_dim <= 0 || rotary_dim % 2 ||
        rotary_dim > head_size || rotary_dim / 2 > MAX_HALF || q_stride < num_heads * head_size ||
        k_stride < num_kv_heads * head_size || dtype < DTYPE_F32 || dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "rotary_embedding: invalid sizes or dtype");
        return NULL;
    }
    const int64_t *pos = (const int64_t *)PTR(positions);
    for (int64_t t = 0; t < tokens; t++) {
        if (pos[t] < 0 || pos[t] >= max_pos) {
            PyErr_Format(PyExc_ValueError,
                         "rotary_embedding: position %lld of token %lld is outside the table's "
                         "%lld positions (max_position_embeddings)",
                         (long long)pos[t], (long long)t, (long long)max_pos);
            return NULL;
        }
    }
    const int nt = threads_for(tokens * (num_heads + num_kv_heads) * rotary_dim, num_threads);
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        thread_share(tokens, &begin, &end);
        rotate_tokens(pos, PTR(query), PTR(key), begin, end,
                      num_heads, num_kv_heads, head_size, rotary_dim / 2, q_stride, k_stride,
                      (const float *)PTR(cos_sin), dtype);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}
