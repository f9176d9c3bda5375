/*
 * Writes each new token's key and value rows into its slot of the paged KV cache on
 * the CPU (what `k_cache.index_copy_(0, slot_mapping, k)` does for K and V at once).
 * key, value: [tokens, row] with row strides k_stride / v_stride (elements);
 * key_cache, value_cache: [num_slots, row] contiguous; slot_mapping: [tokens] int64.
 */
#include "cpu_types.h"

/* reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, tokens, row,
 *                   k_stride, v_stride, num_slots, dtype) */
PyObject *vllm_reshape_and_cache(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long key, value, key_cache, value_cache, slot_mapping;
    int64_t tokens, row, k_stride, v_stride, num_slots;
    int dtype;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLi", &key, &value, &key_cache, &value_cache,
                          &slot_mapping, &tokens, &row, &k_stride, &v_stride, &num_slots, &dtype))
        return NULL;
    if (tokens < 0 || row <= 0 || k_stride < row || v_stride < row || dtype < DTYPE_F32 ||
        dtype > DTYPE_F16) {
        PyErr_SetString(PyExc_ValueError, "reshape_and_cache: invalid sizes or dtype");
        return NULL;
    }
    const int64_t *slots = (const int64_t *)PTR(slot_mapping);
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0 || slots[t] >= num_slots) {
            PyErr_Format(PyExc_ValueError,
                         "reshape_and_cache: slot %lld of token %lld is outside the cache's "
                         "%lld slots",
                         (long long)slots[t], (long long)t, (long long)num_slots);
            return NULL;
        }
    }
    const size_t es = (size_t)dtype_size(dtype), bytes = (size_t)row * es;
    const char *k = PTR(key), *v = PTR(value);
    char *kc = PTR(key_cache), *vc = PTR(value_cache);
    Py_BEGIN_ALLOW_THREADS;
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(kc + (size_t)slots[t] * bytes, k + (size_t)(t * k_stride) * es, bytes);
        memcpy(vc + (size_t)slots[t] * bytes, v + (size_t)(t * v_stride) * es, bytes);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}
