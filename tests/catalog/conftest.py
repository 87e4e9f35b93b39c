from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.servers import DockerRegistry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    if not DockerRegistry.available():
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed (.ci/run installs it)")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    reg = DockerRegistry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()
