from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobstore.store import Store
from tests.faultproxy import FaultProxy
from tests.servers import DockerRegistry, FaultServer, running_registry


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    yield from running_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def proxy(registry: DockerRegistry) -> Iterator[FaultProxy]:
    """One fault proxy per module; each example swaps the fault schedule."""
    with FaultProxy(registry.port) as px:
        yield px


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A folder for the module's stores, removed at its end."""
    d = Path(tempfile.mkdtemp(prefix="blobctl-faults-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
