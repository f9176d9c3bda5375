/*
 * RMSNorm, optionally fused with the residual add before it, on the CPU.
 *
 *   residual == NULL:  out = weight * norm(x)
 *   residual != NULL:  residual = x + residual;  out = weight * norm(residual)
 *
 * norm(h) = h / sqrt(mean(h^2) + eps) in float32. For 16-bit dtypes every step is
 * rounded where Hugging Face's RMSNorm rounds it (the sum, the normalised value, the
 * product with the weight), so results match transformers up to summation order.
 * Rows are contiguous; out may alias x.
 */
#include "cpu_types.h"

MULTIVERSION static void norm_rows(void *out, void *x, void *residual, const void *weight,
                                   int64_t begin, int64_t end, int64_t hidden, float eps,
                                   int dtype, float *buf /* 3 * hidden */) {
    const size_t row_bytes = (size_t)hidden * dtype_size(dtype);
    float *h = buf, *w = buf + hidden, *res = buf + 2 * hidden;
    load_f32(w, weight, hidden, dtype);
    for (int64_t r = begin; r < end; r++) {
        char *xr = (char *)x + r * row_bytes;
        load_f32(h, xr, hidden, dtype);
        if (residual != NULL) {
            char *rr = (char *)residual + r * row_bytes;
            load_f32(res, rr, hidden, dtype);
            for (int64_t i = 0; i < hidden; i++) h[i] += res[i];
            round_to(h, hidden, dtype);
            store_f32(rr, h, hidden, dtype);
        }
        v8f acc = splat(0.0f);
        int64_t i = 0;
        for (; i + 8 <= hidden; i += 8) acc += *(const v8f *)(h + i) * *(const v8f *)(h + i);
        float ss = hsum(acc);
        for (; i < hidden; i++) ss += h[i] * h[i];
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
        for (i = 0; i < hidden; i++) h[i] *= inv;
        round_to(h, hidden, dtype);
        for (i = 0; i < hidden; i++) h[i] *= w[i];
        store_f32((char *)out + r * row_bytes, h, hidden, dtype);
    }
}

/* rms_norm(out, x, residual or 0, weight, rows, hidden, eps, dtype, num_threads) */
PyObject *vllm_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, x, residual, weight;
    int64_t rows, hidden;
    float eps;
    int dtype, num_threads;
    if (!PyArg_ParseTuple(args, "KKKKLLfii", &out, &x, &residual, &weight, &rows, &hidden, &eps,
                          &dtype, &num_threads))
        return NULL;
    if (rows < 0 || hidden <= 0 || dtype < DTYPE_F32 || dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: invalid sizes or dtype");
        return NULL;
    }
    const int nt = threads_for(rows * hidden, num_threads);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        int64_t begin, end;
        thread_share(rows, &begin, &end);
        float *buf = malloc(3 * (size_t)hidden * sizeof(float));
        if (buf == NULL) {
            failed = 1;
        } else {
            norm_rows(PTR(out), PTR(x), residual ? PTR(residual) : NULL, PTR(weight),
                      begin, end, hidden, eps, dtype, buf);
            free(buf);
        }
    }
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
