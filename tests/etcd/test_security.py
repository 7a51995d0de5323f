"""etcd over TLS with client certificates, and with user/password authentication."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from tm_sidecar import EtcdConfig, EtcdError, EtcdUnavailable
from tm_sidecar.etcd import TRANSPORTS, connect
from tm_sidecar.ops._embedded import EtcdProcess


@pytest.fixture(scope="module")
def tls_etcd(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EtcdProcess, dict[str, str]]]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("tm-sidecar@example.invalid")
    files = {
        "ca": str(d / "ca.pem"),
        "server_cert": str(d / "server.pem"),
        "server_key": str(d / "server.key"),
        "client_cert": str(d / "client.pem"),
        "client_key": str(d / "client.key"),
    }
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["server_cert"])
    server.private_key_pem.write_to_path(files["server_key"])
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    proc = EtcdProcess(
        data_dir=d / "etcd", tls=(files["ca"], files["server_cert"], files["server_key"])
    )
    proc.start()
    yield proc, files
    proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_with_client_certificates(
    tls_etcd: tuple[EtcdProcess, dict[str, str]], transport: str
) -> None:
    proc, files = tls_etcd
    assert proc.endpoint.startswith("https://")
    etcd = connect(
        EtcdConfig(
            endpoints=(proc.endpoint,),
            ca_file=files["ca"],
            cert_file=files["client_cert"],
            key_file=files["client_key"],
            transport=transport,  # type: ignore[arg-type]
        )
    )
    await etcd.put(f"/tls/{transport}", "secret")
    kv = await etcd.get(f"/tls/{transport}")
    assert kv is not None
    assert kv.value == "secret"
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_without_a_client_certificate_is_refused(
    tls_etcd: tuple[EtcdProcess, dict[str, str]], transport: str
) -> None:
    proc, files = tls_etcd
    cfg = EtcdConfig(
        endpoints=(proc.endpoint,),
        ca_file=files["ca"],
        timeout_s=2.0,
        transport=transport,  # type: ignore[arg-type]
    )
    # The control: the same etcd, with the client's certificate, answers. Without it, a
    # dead or unreachable etcd would pass for a refusal.
    trusted = connect(
        attrs.evolve(cfg, cert_file=files["client_cert"], key_file=files["client_key"])
    )
    try:
        await trusted.put(f"/tls/control-{transport}", "up")
    finally:
        await trusted.aclose()
    etcd = connect(cfg)
    with pytest.raises((EtcdUnavailable, EtcdError)):
        await etcd.get("/tls/x")
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_with_an_unknown_ca_is_refused(
    tls_etcd: tuple[EtcdProcess, dict[str, str]], tmp_path: Path, transport: str
) -> None:
    proc, files = tls_etcd
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    etcd = connect(
        EtcdConfig(
            endpoints=(proc.endpoint,),
            ca_file=str(other),
            cert_file=files["client_cert"],
            key_file=files["client_key"],
            timeout_s=2.0,
            transport=transport,  # type: ignore[arg-type]
        )
    )
    with pytest.raises(EtcdUnavailable):
        await etcd.get("/tls/x")
    await etcd.aclose()


def _call(
    endpoint: str, path: str, body: dict[str, object], token: str | None = None
) -> dict[str, object]:
    headers = {"Authorization": token} if token else {}
    req = urllib.request.Request(
        f"{endpoint}/v3{path}", data=json.dumps(body).encode(), headers=headers
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return dict(json.loads(resp.read()))


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("auth"))
    proc.start()
    ep = proc.endpoint
    _call(ep, "/auth/role/add", {"name": "root"})
    _call(ep, "/auth/user/add", {"name": "root", "password": "root-pw"})
    _call(ep, "/auth/user/grant", {"user": "root", "role": "root"})
    _call(ep, "/auth/user/add", {"name": "tm", "password": "s3cret-pw"})
    _call(ep, "/auth/role/add", {"name": "tm"})
    _call(
        ep,
        "/auth/role/grant",
        {
            "name": "tm",
            "perm": {"permType": "READWRITE", "key": "L3RtLw==", "range_end": "L3RtMA=="},
        },
    )  # /tm/ .. /tm0
    _call(ep, "/auth/user/grant", {"user": "tm", "role": "tm"})
    _call(ep, "/auth/enable", {})
    yield proc
    proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_user_and_password(
    auth_etcd: EtcdProcess, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = EtcdConfig(
        endpoints=(auth_etcd.endpoint,),
        username="tm",
        password="s3cret-pw",
        transport=transport,  # type: ignore[arg-type]
    )
    etcd = connect(cfg)
    await etcd.put(f"/tm/auth/{transport}", "ok")
    kv = await etcd.get(f"/tm/auth/{transport}")
    assert kv is not None
    with pytest.raises(EtcdError, match="permission denied"):
        await etcd.put("/elsewhere", "no")
    await etcd.aclose()
    assert "s3cret-pw" not in repr(cfg)
    assert "s3cret-pw" not in caplog.text


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_credentials_is_refused(auth_etcd: EtcdProcess, transport: str) -> None:
    etcd = connect(EtcdConfig(endpoints=(auth_etcd.endpoint,), transport=transport))  # type: ignore[arg-type]
    with pytest.raises(EtcdError):
        await etcd.put("/tm/auth/anon", "no")
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_token_etcd_dropped_is_replaced_without_an_error(
    auth_etcd: EtcdProcess, transport: str
) -> None:
    """etcd drops a user's tokens when the user's password is set (here to the same
    one), as it forgets idle simple tokens: the next call authenticates again, once."""
    cfg = EtcdConfig(
        endpoints=(auth_etcd.endpoint,),
        username="tm",
        password="s3cret-pw",
        transport=transport,  # type: ignore[arg-type]
    )
    etcd = connect(cfg)
    await etcd.put(f"/tm/refresh/{transport}", "before")
    lease, _ = await etcd.lease_grant(30)
    ep = auth_etcd.endpoint
    root = str(_call(ep, "/auth/authenticate", {"name": "root", "password": "root-pw"})["token"])
    _call(ep, "/auth/user/changepw", {"name": "tm", "password": "s3cret-pw"}, root)
    await etcd.put(f"/tm/refresh/{transport}", "after")
    kv = await etcd.get(f"/tm/refresh/{transport}")
    assert kv is not None
    assert kv.value == "after"
    assert await etcd.lease_keepalive(lease) == 30
    await etcd.lease_revoke(lease)
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_watch_after_the_token_was_dropped_authenticates_again(
    auth_etcd: EtcdProcess, transport: str
) -> None:
    """A watch opened with a token etcd has dropped: at worst that one stream fails as
    unavailable (which the informer retries), and the next one carries a fresh token."""
    cfg = EtcdConfig(
        endpoints=(auth_etcd.endpoint,),
        username="tm",
        password="s3cret-pw",
        timeout_s=3.0,
        transport=transport,  # type: ignore[arg-type]
    )
    etcd = connect(cfg)
    key = f"/tm/watch-refresh/{transport}"
    rev = await etcd.put(key, "1")
    ep = auth_etcd.endpoint
    root = str(_call(ep, "/auth/authenticate", {"name": "root", "password": "root-pw"})["token"])
    _call(ep, "/auth/user/changepw", {"name": "tm", "password": "s3cret-pw"}, root)
    seen: list[str] = []
    failures: list[Exception] = []
    with trio.fail_after(10):
        while not seen:
            try:
                async with aclosing(etcd.watch_once(key, rev, prefix=False)) as changes:
                    async for item in changes:
                        seen += [e.kv.value for e in item.events]
                        break
            except EtcdUnavailable as exc:
                failures.append(exc)
    assert seen == ["1"]
    assert len(failures) <= 1, failures
    await etcd.aclose()
