/* The method table of the extension module vllm._C; each kernel lives in its own file. */
#include "cpu_types.h"

static PyMethodDef methods[] = {
    {"paged_attention_decode", vllm_paged_attention_decode, METH_VARARGS,
     "Decode-step paged attention into a float32 output (paged_attention.c)."},
    {"rms_norm", vllm_rms_norm, METH_VARARGS,
     "RMSNorm, optionally after the residual add, fused (layernorm.c)."},
    {"silu_and_mul", vllm_silu_and_mul, METH_VARARGS, "silu(gate) * up (activation.c)."},
    {"rotary_embedding", vllm_rotary_embedding, METH_VARARGS,
     "Neox-style rotary embedding in place on query and key rows (pos_encoding.c)."},
    {"reshape_and_cache", vllm_reshape_and_cache, METH_VARARGS,
     "Write new keys and values into their KV-cache slots (cache.c)."},
    {"argmax_logsumexp", vllm_argmax_logsumexp, METH_VARARGS,
     "Argmax and logsumexp of float32 logits rows in one pass (sampler.c)."},
    {"lowp_linear", vllm_lowp_linear, METH_VARARGS,
     "Linear layer with 16-bit weights computed in float32 (gemm.c)."},
    {"w8_linear", vllm_w8_linear, METH_VARARGS,
     "Linear layer with int8 or float8 E4M3 weights and float32 scales (gemm_w8.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
