from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import DockerRegistry, running_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    yield from running_registry(tmp_path_factory.mktemp("registry"))
