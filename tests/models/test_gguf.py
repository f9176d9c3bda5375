"""load_format="gguf": greedy tokens equal transformers on the weights the file decodes to,
at TP=1 and TP=2; each rank decodes only its own rows and quant blocks; clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from tests.models.gguf_files import CHAT_TEMPLATE, dequantized_reference, write_gguf
from tests.utils import hf_greedy, random_prompts
from vllm import LLM, EngineArgs, SamplingParams
from vllm.model_executor.model_loader.gguf import tensor as gguf_tensor
from vllm.model_executor.model_loader.gguf.loader import gguf_weights_iterator
from vllm.model_executor.model_loader.gguf.tensor import GGUFTensor
from vllm.model_executor.model_loader.safetensors.reader import ReadStats
from vllm.testing import make_model

T = GGMLQuantizationType
VOCAB = 1000
MAX_TOKENS = 16
FP32_ATOL = 2e-4  # as tests/models/test_models.py: same float32 weights, other sum order


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF dir, GGUF file, HF dir of the dequantized weights, prompts, HF tokens)."""
    cache: dict[tuple, tuple] = {}

    def get(arch: str, qtype: GGMLQuantizationType, **overrides):
        key = (arch, qtype, tuple(sorted(overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{qtype.name}")
            hf_dir = make_model(arch, str(root / "hf"), vocab_size=VOCAB, **overrides)
            path = write_gguf(hf_dir, str(root / "model.gguf"), qtype)
            ref = hf_dir
            if qtype != T.F32:
                ref = dequantized_reference(hf_dir, str(root / "ref"), qtype)
            prompts = random_prompts(4, VOCAB, max_len=16)
            cache[key] = (hf_dir, path, prompts, *hf_greedy(ref, prompts, MAX_TOKENS))
        return cache[key]

    return get


def _generate(path: str, prompts, tp: int = 1, **kwargs):
    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=128,
        tensor_parallel_size=tp,
        device="cpu",
        num_gpu_blocks_override=64,
        **kwargs,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    return [o.outputs[0] for o in outputs]


CASES = [
    ("llama", T.F32, 1, {}),
    ("llama", T.Q8_0, 1, {}),
    ("llama", T.Q4_1, 1, {}),
    ("llama", T.Q4_0, 1, {}),
    ("llama", T.Q8_0, 2, {}),
    ("llama", T.Q4_1, 2, {}),
    # q/k biases are permuted with their rows; 2 KV heads over 2 ranks
    ("llama", T.Q8_0, 2, {"attention_bias": True}),
    ("llama", T.Q4_0, 1, {"tie_word_embeddings": True}),  # no output.weight in the file
    ("qwen2", T.F32, 1, {}),  # q/k/v biases, rows not permuted
    ("qwen2", T.Q8_0, 2, {}),
]


@pytest.mark.parametrize(
    ("arch", "qtype", "tp", "overrides"),
    CASES,
    ids=[f"{a}-{q.name}-tp{t}{'-' + '-'.join(o) if o else ''}" for a, q, t, o in CASES],
)
def test_greedy_matches_transformers_on_dequantized_weights(models, arch, qtype, tp, overrides):
    hf_dir, path, prompts, hf_tokens, hf_logprobs = models(arch, qtype, **overrides)
    outputs = _generate(path, prompts, tp, tokenizer=hf_dir)
    assert [c.token_ids for c in outputs] == hf_tokens
    for comp, ref_lp in zip(outputs, hf_logprobs):
        for token_id, lp in comp.logprobs[-1].items():
            assert lp.logprob == pytest.approx(ref_lp[token_id].item(), abs=FP32_ATOL)


def test_own_tokenizer_chat_template_and_eos(tmp_path):
    """Without tokenizer=, the engine reads the GGUF's tokenizer and chat template, and its
    EOS id is the one the file names."""
    hf_dir = make_model("llama", str(tmp_path / "hf"), vocab_size=VOCAB)
    path = write_gguf(hf_dir, str(tmp_path / "own.gguf"), T.Q8_0, with_tokenizer=True)
    llm = LLM(model=path, load_format="gguf", dtype="float32", max_model_len=128)
    tok = llm.get_tokenizer()
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "The quick brown fox jumps over the lazy dog. Hello world, 0123456789."
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>user: Hello</s><s>assistant:"
    assert llm.llm_engine.generation_config["eos_token_id"] == 1
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out[0].prompt_token_ids == hf_tok.encode(text)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_gguf_is_implied_by_the_file_and_quantization_gguf_accepted(models):
    _, path, *_ = models("llama", T.Q8_0)
    config = EngineArgs(model=path, quantization="gguf").create_engine_config()
    assert config.load_config.load_format == "gguf"
    assert config.model_config.quantization is None  # dequantized as it loads
    assert config.model_config.architecture == "LlamaForCausalLM"
    assert config.model_config.hf_config.tie_word_embeddings is False


# ---- lazy slices: only a rank's rows and quant blocks are read -----------------------------


def test_rank_slice_dequantizes_only_its_rows(models, monkeypatch):
    """Rank 1 of 2 takes heads 2-3 of attn_q: 32 of 64 rows, found through the Q/K
    permutation, and nothing else is decoded; a column range decodes the blocks covering
    it. The values are those of the dequantized Hugging Face weights."""
    _, path, *_ = models("llama", T.Q8_0)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file="model.gguf")
    stats = ReadStats()
    views = dict(gguf_weights_iterator(GGUFReader(path), hf_config, torch.float32, stats))
    seen: list[tuple[int, ...]] = []
    real = quants.dequantize
    monkeypatch.setattr(
        gguf_tensor.quants, "dequantize", lambda a, q: seen.append(a.shape) or real(a, q)
    )
    row_bytes = 64 // 32 * 34  # 64 columns = 2 Q8_0 blocks of 34 bytes
    q = views["model.layers.0.self_attn.q_proj.weight"]
    rank1 = q.narrow(0, 32, 32)[:]
    assert seen == [(32, row_bytes)] and stats.bytes_read == 32 * row_bytes
    ref = _reference_q(path, hf_config)
    torch.testing.assert_close(rank1, ref[32:64], rtol=0, atol=0)

    seen.clear()
    stats.bytes_read = 0
    o = views["model.layers.0.self_attn.o_proj.weight"]
    cols = o.narrow(1, 40, 20)[:]  # columns 40-59: the second block only
    assert seen == [(64, 34)] and stats.bytes_read == 64 * 34
    torch.testing.assert_close(cols, o[:][:, 40:60], rtol=0, atol=0)


def _reference_q(path: str, hf_config) -> torch.Tensor:
    """transformers' own GGUF decoding of blk.0.attn_q (reverse permutation included)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    w = quants.dequantize(t.data, t.tensor_type)
    proc = LlamaTensorProcessor(config=hf_config.to_dict())
    return torch.from_numpy(proc.process(weights=w, name=t.name).weights.copy())


SLICE_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K]


@pytest.mark.parametrize("qtype", SLICE_TYPES, ids=[t.name for t in SLICE_TYPES])
def test_slices_match_full_dequantize(tmp_path, qtype):
    """Row ranges, unaligned column ranges, both, and a row map agree with slicing the
    whole dequantized tensor. K-quants (256-value blocks, which gguf-py cannot quantize)
    are random bytes with their float16 scales made finite."""
    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    if qtype in (T.Q4_K, T.Q6_K):
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        raw = raw.reshape(rows, -1, size)
        # The float16 super-block scales: d and dmin first in a Q4_K block, d last in Q6_K.
        for at in (0, 2) if qtype == T.Q4_K else (size - 2,):
            scale = rng.uniform(0.01, 1, raw.shape[:2]).astype(np.float16)
            raw[..., at : at + 2] = scale.view(np.uint8).reshape(rows, -1, 2)
        data = raw.reshape(rows, -1)
    else:
        data = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    path = str(tmp_path / "t.gguf")
    w = GGUFWriter(path, "llama")
    w.add_tensor("m", data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = GGUFReader(path).tensors[0]
    full = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.isfinite(full).all()
    view = GGUFTensor("m", t.tensor_type, t.data, (rows, cols), torch.float32)
    torch.testing.assert_close(view[:], full, rtol=0, atol=0)
    torch.testing.assert_close(view.narrow(0, 2, 3)[:], full[2:5], rtol=0, atol=0)
    torch.testing.assert_close(view.narrow(1, 37, 300)[:], full[:, 37:337], rtol=0, atol=0)
    both = view.narrow(1, 250, 20).narrow(0, 1, 4).narrow(1, 3, 10)
    torch.testing.assert_close(both[:], full[1:5, 253:263], rtol=0, atol=0)
    perm = np.array([5, 3, 1, 0, 2, 4])
    mapped = GGUFTensor("m", t.tensor_type, t.data, (rows, cols), torch.float32, rows=perm)
    torch.testing.assert_close(mapped.narrow(0, 1, 3)[:], full[[3, 1, 0]], rtol=0, atol=0)
    assert view.narrow(0, 2, 3).get_shape() == [3, cols]
    assert view[:].dtype == torch.float32
    assert GGUFTensor("m", t.tensor_type, t.data, (rows, cols), torch.bfloat16)[:].dtype == (
        torch.bfloat16
    )


# ---- errors ----------------------------------------------------------------------------------


def test_unsupported_tensor_type_names_tensor_and_type(models, tmp_path):
    hf_dir, *_ = models("llama", T.F32)
    path = write_gguf(
        hf_dir,
        str(tmp_path / "i8.gguf"),
        skip=("blk.1.ffn_up.weight",),
        extra_tensors={"blk.1.ffn_up.weight": np.ones((128, 64), dtype=np.int8)},
    )
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' is stored as I8.*Q4_K"):
        LLM(model=path, tokenizer=hf_dir, max_model_len=128)


def test_unknown_tensor_name_is_named(models, tmp_path):
    hf_dir, *_ = models("llama", T.F32)
    extra = {"blk.0.attn_foo.weight": np.ones(4, np.float32), "rope_freqs.weight": np.ones(8)}
    path = write_gguf(hf_dir, str(tmp_path / "x.gguf"), extra_tensors=extra)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_foo\.weight, rope_freqs\.weight.*RoPE"):
        LLM(model=path, tokenizer=hf_dir, max_model_len=128)


def test_missing_tensor_is_refused(models, tmp_path):
    hf_dir, *_ = models("llama", T.F32)
    path = write_gguf(hf_dir, str(tmp_path / "m.gguf"), skip=("output_norm.weight",))
    with pytest.raises(ValueError, match="not initialized from checkpoint: model.norm.weight"):
        LLM(model=path, tokenizer=hf_dir, max_model_len=128)


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        ("notanarch", r"Could not read a config from the GGUF file .*notanarch.*llama, mistral"),
        ("qwen3", r"holds a 'qwen3' model.*supported: llama, mistral, qwen2"),
    ],
)
def test_unknown_architecture(models, tmp_path, arch, match):
    hf_dir, *_ = models("llama", T.F32)
    path = write_gguf(hf_dir, str(tmp_path / f"{arch}.gguf"), arch=arch)
    with pytest.raises(ValueError, match=match):
        LLM(model=path, tokenizer=hf_dir)


def test_load_format_and_model_must_agree(models):
    hf_dir, path, *_ = models("llama", T.F32)
    with pytest.raises(ValueError, match="load_format='gguf' reads one .gguf file"):
        EngineArgs(model=hf_dir, load_format="gguf").create_engine_config()
    with pytest.raises(ValueError, match="is a GGUF file, which load_format='safetensors'"):
        EngineArgs(model=path, load_format="safetensors").create_engine_config()
