"""LLM.chat (one conversation or many, through the chat template) and
LLM.get_default_sampling_params (from the model's generation_config.json)."""

from __future__ import annotations

import json
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.testing import make_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
]
# What the model's creator recommends, as Hugging Face names it.
GENERATION_DEFAULTS = {
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 7,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    from transformers import AutoTokenizer

    path = make_model("llama", str(tmp_path_factory.mktemp("chat") / "llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "generation_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, **GENERATION_DEFAULTS}, f)
    return LLM(model=path, max_model_len=256, dtype="float32")


def by_hand(llm: LLM, conversation: list[dict], **kwargs) -> tuple[str, list[int]]:
    """The conversation through the tokenizer's own apply_chat_template."""
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    return text, tokenizer.encode(text, add_special_tokens=False)


def test_chat_gives_the_tokens_of_generate_on_the_rendered_template(llm: LLM) -> None:
    text, ids = by_hand(llm, CONVERSATION, add_generation_prompt=True)
    assert text.endswith("<s>assistant:")
    (chat,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    (generated,) = llm.generate(TokensPrompt(prompt_token_ids=ids), GREEDY, use_tqdm=False)
    assert chat.prompt == text
    assert chat.prompt_token_ids == ids
    assert chat.outputs[0].token_ids == generated.outputs[0].token_ids
    assert chat.outputs[0].text == generated.outputs[0].text


def test_a_list_of_conversations_gives_one_output_each_in_order(llm: LLM) -> None:
    other = [{"role": "user", "content": "The capital of France is"}]
    outputs = llm.chat([CONVERSATION, other, CONVERSATION], GREEDY, use_tqdm=False)
    singles = [llm.chat(c, GREEDY, use_tqdm=False)[0] for c in (CONVERSATION, other)]
    assert [o.prompt for o in outputs] == [singles[0].prompt, singles[1].prompt, singles[0].prompt]
    assert [o.outputs[0].token_ids for o in outputs] == [
        singles[0].outputs[0].token_ids,
        singles[1].outputs[0].token_ids,
        singles[0].outputs[0].token_ids,
    ]


def test_continue_final_message(llm: LLM) -> None:
    partial = [*CONVERSATION, {"role": "assistant", "content": "Hello! How can"}]
    text, ids = by_hand(llm, partial, continue_final_message=True)
    (out,) = llm.chat(
        partial, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert out.prompt == text and text.endswith("assistant: Hello! How can")
    assert out.prompt_token_ids == ids


def test_continue_final_message_with_a_generation_prompt_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(CONVERSATION, GREEDY, continue_final_message=True)


def test_no_template_names_what_to_pass(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm.get_tokenizer(), "chat_template", None)
    with pytest.raises(ValueError, match=r"no chat template.*chat_template=<Jinja text>"):
        llm.chat(CONVERSATION, GREEDY)
    # A template given to the call is enough.
    (out,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=CHAT_TEMPLATE)
    assert out.prompt.endswith("<s>assistant:")


def test_template_variables_tools_and_content_parts(llm: LLM) -> None:
    template = (
        "{{ greeting }}{% if tools %} [{{ tools | length }} tools]{% endif %}"
        "{% for m in messages %}|{% for part in m['content'] %}{{ part['text'] }};"
        "{% endfor %}{% endfor %}"
    )
    # A template that loops over content parts gets OpenAI's list form (detected).
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]
    (out,) = llm.chat(
        messages,
        GREEDY,
        use_tqdm=False,
        chat_template=template,
        tools=[{"type": "function", "function": {"name": "f"}}],
        chat_template_kwargs={"greeting": "Hi"},
    )
    assert out.prompt == "Hi [1 tools]|a;b;"
    # The string form joins the text parts, as upstream.
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False, chat_template_content_format="string")
    assert "<s>user: a\nb\n" in out.prompt


def test_non_text_content_is_refused(llm: LLM) -> None:
    image = {"type": "image_url", "image_url": {"url": "file:///x.png"}}
    with pytest.raises(ValueError, match="only text parts are supported.*'image_url'"):
        llm.chat([{"role": "user", "content": [image]}], GREEDY)


def test_default_sampling_params_come_from_generation_config(llm: LLM) -> None:
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    assert (params.min_p, params.repetition_penalty, params.max_tokens) == (0.05, 1.1, 7)
    # generate and chat use them when given no sampling params.
    (out,) = llm.generate("Hello", use_tqdm=False)
    assert len(out.outputs[0].token_ids) <= 7


def test_generation_config_vllm_and_overrides(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    model_config = llm.llm_engine.model_config
    monkeypatch.setattr(llm, "default_sampling_params", None)
    monkeypatch.setattr(model_config, "generation_config", "vllm")
    assert llm.get_default_sampling_params() == SamplingParams()
    monkeypatch.setattr(llm, "default_sampling_params", None)
    monkeypatch.setattr(model_config, "override_generation_config", {"temperature": 0.2})
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.2)


def test_generate_takes_text_and_tokens_prompts(llm: LLM) -> None:
    from vllm.inputs import TextPrompt

    text, tokens = llm.generate(
        [TextPrompt(prompt="Hello"), TokensPrompt(prompt_token_ids=[5, 6, 7])],
        GREEDY,
        use_tqdm=False,
    )
    assert text.prompt == "Hello" and tokens.prompt_token_ids == [5, 6, 7]
    with pytest.raises(ValueError, match="multi_modal_data is not supported"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"image": object()}}, GREEDY)
    with pytest.raises(ValueError, match="Unsupported prompt key.*'prompt_embeds'"):
        llm.generate({"prompt_embeds": [0.0]}, GREEDY)


def test_engine_core_reaches_the_workers(llm: LLM) -> None:
    # upstream V1 scripts call the workers through llm.llm_engine.engine_core
    core = llm.llm_engine.engine_core
    block_bytes = core.collective_rpc("get_cache_block_size_bytes")
    assert block_bytes == llm.collective_rpc("get_cache_block_size_bytes")
    assert len(block_bytes) == 1 and block_bytes[0] > 0
