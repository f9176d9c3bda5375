/*
 * SiLU-and-mul for a fused gate_up projection on the CPU:
 *   out[r, i] = silu(x[r, i]) * x[r, d + i],  silu(g) = g / (1 + exp(-g))
 * computed in float32; for 16-bit dtypes silu's result is rounded before the product,
 * as `act_fn(gate_proj(x)) * up_proj(x)` rounds it in transformers.
 * x: [rows, 2 * d] with row stride x_stride (elements); out: [rows, d] contiguous.
 */
#include "cpu_types.h"

enum { CHUNK = 512 }; /* floats per pass: the gate and up parts stay in L1 */

MULTIVERSION static void silu_mul_rows(void *out, const void *x, int64_t begin, int64_t end,
                                       int64_t d, int64_t x_stride, int dtype) {
    const int es = dtype_size(dtype);
    float g[CHUNK], u[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const char *xr = (const char *)x + (size_t)(r * x_stride) * es;
        char *orow = (char *)out + (size_t)(r * d) * es;
        for (int64_t c = 0; c < d; c += CHUNK) {
            const int64_t n = d - c < CHUNK ? d - c : CHUNK;
            load_f32(g, xr + c * es, n, dtype);
            load_f32(u, xr + (d + c) * es, n, dtype);
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                const v8f gv = *(const v8f *)(g + i);
                *(v8f *)(g + i) = gv / (1.0f + exp_v8(-gv));
            }
            for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i]));
            round_to(g, n, dtype);
            for (i = 0; i < n; i++) g[i] *= u[i];
            store_f32(orow + c * es, g, n, dtype);
        }
    }
}

/* silu_and_mul(out, x, rows, d, x_stride, dtype, num_threads) */
PyObject *vllm_silu_and_mul(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, x;
    int64_t rows, d, x_stride;
    int dtype, num_threads;
    if (!PyArg_ParseTuple(args, "KKLLLii", &out, &x, &rows, &d, &x_stride, &dtype, &num_threads))
        return NULL;
    if (rows < 0 || d <= 0 || x_stride < 2 * d || dtype < DTYPE_F32 || dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "silu_and_mul: invalid sizes or dtype");
        return NULL;
    }
    const int nt = threads_for(rows * d, num_threads);
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        thread_share(rows, &begin, &end);
        silu_mul_rows(PTR(out), PTR(x), begin, end, d, x_stride, dtype);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}
