"""A real etcd for the property tests that need one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tm_sidecar.ops._embedded import EtcdProcess


@pytest.fixture(scope="session")
def prop_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for every property test of the run."""
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("prop-etcd"), auto_compaction="0")
    proc.start()
    yield proc
    proc.stop()
