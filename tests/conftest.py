"""The test harness: a real etcd per test module, on free loopback ports."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tm_sidecar.etcd import Etcd, EtcdConfig, connect
from tm_sidecar.ops._embedded import EtcdProcess

_counter = itertools.count()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """A private etcd for this test module."""
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("etcd"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def etcd(etcd_server: EtcdProcess) -> AsyncIterator[Etcd]:
    """A client (the default transport) of the module's etcd."""
    client = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of this test's own, to kill, restart or compact (no auto-compaction: a
    test compacts when it means to)."""
    proc = EtcdProcess(data_dir=tmp_path / "etcd", auto_compaction="0")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test of the module uses."""
    return f"t{next(_counter)}"


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tm_sidecar")


def pytest_configure(config: pytest.Config) -> None:
    Path(config.rootpath, ".hypothesis").mkdir(exist_ok=True)
