/*
 * Paged attention for decode steps on the CPU: one query token per sequence, read
 * straight from the block-structured KV cache (no gather into a padded batch).
 *
 * Built as the extension module vllm._C (see setup.py). It has no torch dependency:
 * vllm/_custom_ops.py checks shapes, dtypes and strides and passes data pointers.
 * The pure-torch path in vllm/attention/backend.py computes the same thing and is
 * used when this module is not built.
 *
 * Layouts (element strides):
 *   query       [num_seqs, num_heads, head_size], row stride q_stride, heads packed
 *   key/value   [num_blocks * block_size, num_kv_heads, head_size], contiguous
 *   block_table [num_seqs, max_blocks] int64, contiguous
 *   seq_lens    [num_seqs] int64
 *   out         [num_seqs, num_heads, head_size], contiguous
 * Query head h attends with kv head h / (num_heads / num_kv_heads), as in GQA.
 * Accumulation is in float32 for every storage dtype.
 */
#include "cpu_types.h"

/* Cache slots the K and V passes prefetch ahead of the one they compute with: slots are
 * scattered over the cache a block at a time, and the explicit prefetch takes the decode
 * step's 12 attention calls from ~13.5 to ~11.5 ms on a 2-core Xeon (4 beat 2, 6, 8, 16). */
enum { MAX_HEAD_SIZE = 256, PREFETCH_AHEAD = 4 };

typedef struct {
    float *out_f32; /* [num_seqs, num_heads, head_size] float32 results */
    const void *query, *key_cache, *value_cache;
    const int64_t *block_table, *seq_lens;
    int64_t num_seqs, num_heads, num_kv_heads, head_size, block_size, max_blocks;
    int64_t q_stride, max_seq_len;
    float scale;
    int dtype;
    /* A thread takes sequences [begin, end). */
    int64_t begin, end;
    int error;
} Job;

static inline void prefetch_row(const char *row, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)row + b);
}

/*
 * One sequence, every head. k_rows/v_rows[t] point at token t's cache slot (all kv
 * heads, in the cache's dtype, widened to float32 as they are read); scores holds room
 * for every head's max_seq_len rounded up to 8 (stride `padded`), acc for every head's
 * output. Token-major: each slot's K and V are read once, front to back, for all heads
 * (a slot is num_kv_heads * d contiguous values, a block 16 such slots), and each kv
 * head's part serves its group of query heads from registers (a 16-bit kv head is
 * widened once into `kw` for its group). Inlined into a copy per dtype and common head
 * size so the loops over head_size unroll.
 */
static inline __attribute__((always_inline)) void seq_attention(
    const Job *j, const char *const *k_rows, const char *const *v_rows, const float *q,
    int64_t len, float *scores, float *acc_mem, float *out, const int64_t d, const int dtype) {
    const int64_t heads = j->num_heads, kv_heads = j->num_kv_heads, group = heads / kv_heads;
    const int64_t nv = d / 8, padded = (len + 7) & ~(int64_t)7, es = dtype_size(dtype);
    const int64_t row_bytes = kv_heads * d * es;
    v8f kw[MAX_HEAD_SIZE / 8];
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_AHEAD < len) prefetch_row(k_rows[t + PREFETCH_AHEAD], row_bytes);
        for (int64_t g = 0; g < kv_heads; g++) {
            const char *kg = k_rows[t] + g * d * es;
            const v8f *k = (const v8f *)kg;
            if (dtype != DTYPE_F32) {
                for (int64_t i = 0; i < nv; i++) kw[i] = load8_f32(kg + i * 8 * es, dtype);
                k = kw;
            }
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const v8f *qh = (const v8f *)(q + h * d);
                v8f acc = splat(0.0f);
                for (int64_t i = 0; i < nv; i++) acc += qh[i] * k[i];
                scores[h * padded + t] = hsum(acc) * j->scale;
            }
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *sc = scores + h * padded;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; t++) m = sc[t] > m ? sc[t] : m;
        for (int64_t t = len; t < padded; t++) sc[t] = -INFINITY; /* exp gives ~1e-38 */
        v8f sum8 = splat(0.0f);
        for (int64_t t = 0; t < padded; t += 8) {
            v8f e = exp_v8(*(v8f *)(sc + t) - m);
            *(v8f *)(sc + t) = e;
            sum8 += e;
        }
        const float inv = 1.0f / hsum(sum8);
        for (int64_t t = 0; t < len; t++) sc[t] *= inv;
    }
    v8f *acc = (v8f *)acc_mem;
    for (int64_t i = 0; i < heads * nv; i++) acc[i] = splat(0.0f);
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_AHEAD < len) prefetch_row(v_rows[t + PREFETCH_AHEAD], row_bytes);
        for (int64_t g = 0; g < kv_heads; g++) {
            const char *vg = v_rows[t] + g * d * es;
            const v8f *v = (const v8f *)vg;
            if (dtype != DTYPE_F32) {
                for (int64_t i = 0; i < nv; i++) kw[i] = load8_f32(vg + i * 8 * es, dtype);
                v = kw;
            }
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const v8f w = splat(scores[h * padded + t]);
                v8f *a = acc + h * nv;
                for (int64_t i = 0; i < nv; i++) a[i] += w * v[i];
            }
        }
    }
    for (int64_t i = 0; i < heads * nv; i++) ((v8f *)out)[i] = acc[i];
}

/* One copy of seq_attention per dtype, each unrolled for the common head sizes. */
#define SEQ_ATTENTION_FOR(DT)                                                                   \
    switch (d) {                                                                                \
        case 64: seq_attention(j, k_rows, v_rows, q, len, scores, acc, out, 64, DT); break;     \
        case 128: seq_attention(j, k_rows, v_rows, q, len, scores, acc, out, 128, DT); break;   \
        default: seq_attention(j, k_rows, v_rows, q, len, scores, acc, out, d, DT); break;      \
    }

MULTIVERSION static void run_job(Job *j) {
    const int64_t d = j->head_size, heads = j->num_heads, max_len = j->max_seq_len;
    const int64_t row_len = j->num_kv_heads * d; /* elements of one cache slot */
    const size_t esize = (size_t)dtype_size(j->dtype);
    /* Scratch: row pointers; every head's query, output accumulator and scores. */
    const size_t floats = (size_t)(2 * heads * d + heads * (max_len + 8));
    void *mem = malloc(sizeof(char *) * 2 * (size_t)max_len + sizeof(float) * floats);
    if (mem == NULL) {
        j->error = 1;
        return;
    }
    const char **k_rows = (const char **)mem, **v_rows = k_rows + max_len;
    float *q = (float *)(v_rows + max_len), *acc = q + heads * d, *scores = acc + heads * d;

    for (int64_t s = j->begin; s < j->end; s++) {
        const int64_t len = j->seq_lens[s];
        const int64_t *blocks = j->block_table + s * j->max_blocks;
        load_f32(q, (const char *)j->query + (size_t)(s * j->q_stride) * esize, heads * d, j->dtype);
        for (int64_t t = 0; t < len; t++) {
            const size_t slot = (size_t)(blocks[t / j->block_size] * j->block_size + t % j->block_size);
            k_rows[t] = (const char *)j->key_cache + slot * (size_t)row_len * esize;
            v_rows[t] = (const char *)j->value_cache + slot * (size_t)row_len * esize;
        }
        float *out = j->out_f32 + s * heads * d;
        if (j->dtype == DTYPE_F32) SEQ_ATTENTION_FOR(DTYPE_F32)
        else if (j->dtype == DTYPE_BF16) SEQ_ATTENTION_FOR(DTYPE_BF16)
        else SEQ_ATTENTION_FOR(DTYPE_F16)
    }
    free(mem);
}

PyObject *vllm_paged_attention_decode(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, query, key_cache, value_cache, block_table, seq_lens;
    Job base;
    int64_t num_slots;
    int num_threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLLLLfii", &out, &query, &key_cache, &value_cache,
                          &block_table, &seq_lens, &base.num_seqs, &base.num_heads,
                          &base.num_kv_heads, &base.head_size, &base.block_size,
                          &base.max_blocks, &base.q_stride, &num_slots, &base.scale,
                          &base.dtype, &num_threads))
        return NULL;
    if (base.num_kv_heads <= 0 || base.num_heads % base.num_kv_heads != 0 || base.head_size <= 0 ||
        base.head_size > MAX_HEAD_SIZE || base.head_size % 8 || base.block_size <= 0 ||
        base.dtype < DTYPE_F32 || base.dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "paged_attention_decode: invalid sizes or dtype");
        return NULL;
    }
    /* Every length must fit its row of the table and every block the cache: the loops
     * below trust them. */
    base.block_table = (const int64_t *)(uintptr_t)block_table;
    base.seq_lens = (const int64_t *)(uintptr_t)seq_lens;
    base.max_seq_len = 0;
    int64_t total_len = 0;
    const int64_t num_blocks = num_slots / base.block_size;
    for (int64_t s = 0; s < base.num_seqs; s++) {
        const int64_t len = base.seq_lens[s];
        if (len < 1 || len > base.max_blocks * base.block_size) {
            PyErr_Format(PyExc_ValueError,
                         "paged_attention_decode: sequence %lld has length %lld; its block "
                         "table row holds 1 to %lld tokens",
                         (long long)s, (long long)len, (long long)(base.max_blocks * base.block_size));
            return NULL;
        }
        for (int64_t b = 0; b < (len + base.block_size - 1) / base.block_size; b++) {
            const int64_t id = base.block_table[s * base.max_blocks + b];
            if (id < 0 || id >= num_blocks) {
                PyErr_Format(PyExc_ValueError,
                             "paged_attention_decode: block id %lld of sequence %lld is outside "
                             "the cache's %lld blocks",
                             (long long)id, (long long)s, (long long)num_blocks);
                return NULL;
            }
        }
        if (len > base.max_seq_len) base.max_seq_len = len;
        total_len += len;
    }
    base.out_f32 = (float *)(uintptr_t)out;
    base.query = (const void *)(uintptr_t)query;
    base.key_cache = (const void *)(uintptr_t)key_cache;
    base.value_cache = (const void *)(uintptr_t)value_cache;
    base.error = 0;

    /* Sequences are split evenly over OpenMP threads. Linked against libgomp.so.1, this
     * module shares the OpenMP runtime torch has already loaded, and so its thread
     * pool: no extra threads competing with torch's for the cores. */
    const int64_t items = base.num_seqs;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > items) num_threads = (int)(items > 0 ? items : 1);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* Equal shares of the tokens to read, not of the sequences: a thread's time is
         * the KV bytes it streams. */
        int64_t first, last;
        thread_share(total_len, &first, &last);
        int64_t begin = 0, end = 0, seen = 0;
        for (int64_t s = 0; s < items; s++) {
            const int64_t mid = seen + base.seq_lens[s] / 2; /* a sequence goes where its middle falls */
            if (mid < first) begin = s + 1;
            if (mid < last) end = s + 1;
            seen += base.seq_lens[s];
        }
        Job job = base;
        job.begin = begin;
        job.end = end;
        run_job(&job);
        failed |= job.error;
    }
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
