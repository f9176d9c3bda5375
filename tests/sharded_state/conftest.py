import pytest

from tests.sharded_state.common import ARCHS
from vllm.testing import make_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> directory of a tiny random Hugging Face model, built once per session."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_model(arch, str(tmp_path_factory.mktemp(arch)), ARCHS[arch])
        return cache[arch]

    return get
