from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.servers import DockerRegistry, running_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    yield from running_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def llama_cpp() -> object:
    """The llama_cpp module; a failure in CI, where .ci/run installs it."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed (.ci/run installs the llm extra)")
        pytest.skip("llama-cpp-python is not installed: pip install 'blobctl[llm]'")
    return llama_cpp
