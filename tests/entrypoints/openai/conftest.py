import pytest

from tests.entrypoints.openai.server import RemoteOpenAIServer
from vllm import LLM
from vllm.testing import make_model

MAX_MODEL_LEN = 256
SERVED_NAMES = ["tiny-llama", "tiny-alias"]
# A template in the shape of real ones: special tokens written by the template itself.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def chat_template_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("template") / "template.jinja"
    path.write_text(CHAT_TEMPLATE)
    return str(path)


@pytest.fixture(scope="session")
def server(model_dir, chat_template_file):
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--chat-template", chat_template_file,
            "--served-model-name", *SERVED_NAMES]  # fmt: skip
    with RemoteOpenAIServer(model_dir, args) as remote:
        yield remote


@pytest.fixture(scope="session")
def offline_llm(model_dir) -> LLM:
    """The same model in this process, through LLM.generate: what the server must match."""
    return LLM(model=model_dir, max_model_len=MAX_MODEL_LEN)
