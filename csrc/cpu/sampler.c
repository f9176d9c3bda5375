/*
 * One pass over float32 logits rows for the sampler: the argmax of each row (the first
 * index of its maximum, a NaN counting as the maximum, as torch.argmax), the row's
 * maximum m and log(sum(exp(row - m))), so that
 *   log_softmax(row)[i] = (row[i] - m) - log_sum
 * without materialising it (and without the rounding of m + log_sum at large |m|).
 * logits: [rows, vocab] with row stride `stride` (elements); ids: [rows] int64;
 * maxes, log_sums: [rows] float32, log_sums NULL for the argmax alone (random sampling's
 * exponential race needs no log-probabilities: it skips the exp over the row).
 */
#include "cpu_types.h"

MULTIVERSION static void rows_argmax_lse(const float *logits, int64_t begin, int64_t end,
                                         int64_t vocab, int64_t stride, int64_t *ids,
                                         float *maxes, float *log_sums) {
    for (int64_t r = begin; r < end; r++) {
        const float *x = logits + r * stride;
        v8f m8 = splat(-INFINITY);
        v8i nan8 = (v8i)splat(0.0f);
        int64_t i = 0;
        for (; i + 8 <= vocab; i += 8) {
            const v8f v = *(const v8f *)(x + i);
            nan8 |= (v != v);
            m8 = vmax(m8, v);
        }
        float m = -INFINITY;
        int has_nan = 0;
        for (int l = 0; l < 8; l++) {
            m = m8[l] > m ? m8[l] : m;
            has_nan |= nan8[l] != 0;
        }
        for (int64_t t = i; t < vocab; t++) {
            m = x[t] > m ? x[t] : m;
            has_nan |= x[t] != x[t];
        }
        int64_t arg = 0;
        if (has_nan) {
            while (x[arg] == x[arg]) arg++;
            ids[r] = arg;
            maxes[r] = NAN;
            if (log_sums) log_sums[r] = NAN;
            continue;
        }
        while (arg < vocab - 1 && x[arg] != m) arg++;
        ids[r] = arg;
        maxes[r] = m;
        if (!log_sums) continue;
        if (m == -INFINITY) { /* every logit -inf: nothing can be sampled */
            log_sums[r] = 0.0f;
            continue;
        }
        v8f s8 = splat(0.0f);
        for (i = 0; i + 8 <= vocab; i += 8) s8 += exp_v8(*(const v8f *)(x + i) - m);
        float sum = hsum(s8);
        for (; i < vocab; i++) sum += expf(x[i] - m);
        log_sums[r] = logf(sum);
    }
}

/* argmax_logsumexp(logits, rows, vocab, stride, ids, maxes, log_sums_or_0, num_threads) */
PyObject *vllm_argmax_logsumexp(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long logits, ids, maxes, log_sums;
    int64_t rows, vocab, stride;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KLLLKKKi", &logits, &rows, &vocab, &stride, &ids, &maxes,
                          &log_sums, &num_threads))
        return NULL;
    if (rows < 0 || vocab <= 0 || stride < vocab) {
        PyErr_SetString(PyExc_ValueError, "argmax_logsumexp: invalid sizes");
        return NULL;
    }
    const int nt = threads_for(rows * vocab, num_threads);
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        thread_share(rows, &begin, &end);
        rows_argmax_lse((const float *)PTR(logits), begin, end, vocab,
                        stride, (int64_t *)PTR(ids), (float *)PTR(maxes),
                        log_sums ? (float *)PTR(log_sums) : NULL);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}
