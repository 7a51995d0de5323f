"""The settings table (tm_sidecar/ops/_settings.py): every setting through every layer, for
both commands, generated from the table so that a new setting cannot escape it; secrets
kept out of --help, --print-config and reprs; both commands reach etcd alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT
from tm_sidecar.ops import _cli, _tmctl
from tm_sidecar.ops._settings import (
    BOOL,
    SETTINGS,
    Cli,
    Setting,
    Settings,
    SettingsError,
    markdown_table,
    resolve,
    settings_of,
)

CLIS: tuple[Cli, ...] = ("tm-sidecar", "tmctl")
PARSERS = {"tm-sidecar": _cli.build_parser, "tmctl": _tmctl.build_parser}
#: tmctl needs a command after its settings.
TAIL: dict[Cli, list[str]] = {"tm-sidecar": [], "tmctl": ["status"]}


def _next(s: Setting, previous: Any, step: int) -> Any:
    """A valid value of ``s`` that differs from ``previous``."""
    if s.choices:
        return next(c for c in s.choices if c != previous)
    if s.kind is BOOL:
        return not previous
    if s.kind.many:
        return [step, step + 10] if s.kind.parse is int else [f"mod{step}:f@q{step}", "m:g"]
    if s.kind.parse is int or s.kind.name == "an octal file mode":
        return previous + step
    if s.kind.parse is float:
        return round(previous * 0.9 + 0.01 * step, 6)  # a fraction stays one
    # The first text the setting's own check takes (an address for metrics, say).
    for text in (f"value{step}-{s.name}", f"127.0.0.{step}:{9000 + step}"):
        try:
            if s.check is not None:
                s.check(text)
        except ValueError:
            continue
        return text
    raise AssertionError(f"no example value for {s.name}: add one here")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _flag(s: Setting, value: Any) -> list[str]:
    if s.kind is BOOL:
        return [s.flag if value else "--no-" + s.flag[2:]]
    if s.kind.many:
        return [arg for item in value for arg in (s.flag, str(item))]
    return [s.flag, s.kind.text(value)]


def _load(cli: Cli, argv: list[str], environ: dict[str, str]) -> Settings:
    args = PARSERS[cli]().parse_args([*argv, *TAIL[cli]])
    return resolve(cli, args, environ)


def _walk() -> list[tuple[Cli, Setting]]:
    return [(cli, s) for cli in CLIS for s in settings_of(cli)]


def test_every_field_is_in_the_table_and_every_command_has_its_settings() -> None:
    import attrs

    assert {f.name for f in attrs.fields(Settings)} - {"sources"} == {s.name for s in SETTINGS}
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)
    for cli in CLIS:
        help_text = PARSERS[cli]().format_help()
        for s in settings_of(cli):
            assert s.flag in help_text
            assert s.env in help_text
    tmctl = {s.name for s in settings_of("tmctl")}
    assert {"etcd", "namespace", "data_dir", "etcd_transport", "etcd_password"} <= tmctl


@pytest.mark.parametrize(("cli", "setting"), _walk(), ids=lambda v: getattr(v, "name", v))
def test_each_layer_beats_the_one_below(cli: Cli, setting: Setting, tmp_path: Path) -> None:
    s = setting
    default = s.default_for({})
    loaded = _load(cli, [], {})
    assert getattr(loaded, s.name) == default
    assert loaded.sources[s.name] == "default"

    in_file = _next(s, default, 1)
    config = tmp_path / "tm.toml"
    config.write_text(f"{s.toml} = {_toml(in_file)}\n")
    environ = {"TM_CONFIG": str(config)}
    loaded = _load(cli, [], environ)
    assert getattr(loaded, s.name) == in_file, "the file wins over the default"
    assert loaded.sources[s.name].endswith(f": {s.toml}")

    in_env = _next(s, in_file, 2)
    environ[s.env] = s.kind.show(in_env)
    loaded = _load(cli, [], environ)
    assert getattr(loaded, s.name) == in_env, "the environment wins over the file"
    assert loaded.sources[s.name] == s.env

    in_flag = _next(s, in_env, 3)
    loaded = _load(cli, _flag(s, in_flag), environ)
    assert getattr(loaded, s.name) == in_flag, "the flag wins over the environment"
    assert loaded.sources[s.name] == s.flag


def test_a_command_ignores_the_settings_it_does_not_take(tmp_path: Path) -> None:
    """tmctl can share the sidecar's environment file and TOML file."""
    config = tmp_path / "tm.toml"
    config.write_text('lease_ttl = 9\nnamespace = "shared"\n')
    loaded = _load("tmctl", [], {"TM_CONFIG": str(config), "TM_CONCURRENCY": "nonsense"})
    assert loaded.namespace == "shared"
    assert loaded.lease_ttl == 5
    assert loaded.sources["concurrency"] == "default"


def test_both_commands_reach_etcd_the_same_way(tmp_path: Path) -> None:
    """The same TLS, credentials and transport for tmctl as for the daemon (from one
    function, Settings.etcd_config), whichever layer they come from."""
    config = tmp_path / "tm.toml"
    transports = next(s for s in SETTINGS if s.name == "etcd_transport").choices
    assert transports, "the transports are read from EtcdConfig's type"
    other = next(t for t in transports if t != "grpc")
    config.write_text(f'etcd_transport = "{other}"\netcd_ca = "/ca.pem"\n')
    environ = {"TM_CONFIG": str(config), "TM_ETCD_USER": "u", "TM_ETCD_PASSWORD": "p"}
    argv = ["--etcd", "http://a:2379, http://b:2379", "--etcd-cert", "/c.pem"]
    daemon = _load("tm-sidecar", argv, environ)
    tmctl = _load("tmctl", argv, environ)
    assert daemon.endpoints == ("http://a:2379", "http://b:2379")
    assert daemon.etcd_config(daemon.endpoints) == tmctl.etcd_config(tmctl.endpoints)
    cfg = tmctl.etcd_config(tmctl.endpoints)
    assert (cfg.transport, cfg.ca_file, cfg.cert_file, cfg.username, cfg.password) == (
        other,
        "/ca.pem",
        "/c.pem",
        "u",
        "p",
    )


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "words"),
    [
        (["--lease-ttl", "1"], {}, "", "--lease-ttl: must be at least 2"),
        ([], {"TM_LEASE_TTL": "x"}, "", "TM_LEASE_TTL: invalid literal"),
        ([], {}, "lease_ttl = true", "tm.toml: lease_ttl: expected an integer, not bool"),
        ([], {}, "lease_tll = 3", "unknown setting 'lease_tll'"),
        ([], {"TM_NAMESPACE": "a/b"}, "", "TM_NAMESPACE: invalid namespace 'a/b'"),
        ([], {"TM_ETCD_TRANSPORT": "carrier-pigeon"}, "", "TM_ETCD_TRANSPORT: 'carrier-pigeon'"),
        ([], {"TM_WEB_ACTIONS": "maybe"}, "", "TM_WEB_ACTIONS: expected true or false"),
        ([], {}, 'socket_mode = "9"', "socket_mode: expected an octal file mode"),
        ([], {}, "[etcd]\nendpoints = 1", "tm.toml: etcd: expected a string, not dict"),
    ],
)
def test_a_bad_value_is_refused_naming_where_it_came_from(
    argv: list[str], environ: dict[str, str], toml: str, words: str, tmp_path: Path
) -> None:
    if toml:
        (tmp_path / "tm.toml").write_text(toml + "\n")
        environ = {**environ, "TM_CONFIG": str(tmp_path / "tm.toml")}
    with pytest.raises(SettingsError) as refused:
        _load("tm-sidecar", argv, environ)
    assert words in str(refused.value)


def test_toml_takes_native_values_and_strings(tmp_path: Path) -> None:
    config = tmp_path / "tm.toml"
    config.write_text('socket_mode = 0o600\nretention = 60\nallow_uid = 7\nweb_actions = "yes"\n')
    loaded = _load("tm-sidecar", [], {"TM_CONFIG": str(config)})
    assert (loaded.socket_mode, loaded.retention, loaded.allow_uid) == (0o600, 60.0, [7])
    assert loaded.web_actions is True
    assert isinstance(loaded.retention, float)
    environ = {"TM_ALLOW_UID": "1000, 1001", "TM_SOCKET_MODE": "640", "TM_LOG_LEVEL": "INFO"}
    loaded = _load("tm-sidecar", [], environ)
    assert (loaded.allow_uid, loaded.socket_mode) == ([1000, 1001], 0o640)
    assert loaded.log_level == "info"  # names in any case, as logging took them


SECRETS = {"etcd_password": "pw-s3cret-1", "web_token": "tok-s3cret-2"}


def test_secrets_stay_out_of_help_reprs_and_print_config(tmp_path: Path) -> None:
    secret = {s.name for s in SETTINGS if s.secret}
    assert secret == set(SECRETS)
    environ = {next(s.env for s in SETTINGS if s.name == k): v for k, v in SECRETS.items()}
    config = tmp_path / "tm.toml"
    config.write_text("".join(f'{k} = "{v}-file"\n' for k, v in SECRETS.items()))
    for cli in CLIS:
        loaded = _load(cli, [], {**environ, "TM_CONFIG": str(config)})
        shown = json.dumps(loaded.shown()) + repr(loaded)
        for value in SECRETS.values():
            assert value not in shown
        if cli == "tm-sidecar":
            assert loaded.web_token == SECRETS["web_token"]
            assert loaded.shown()["web_token"] == "***"
        assert loaded.etcd_password == SECRETS["etcd_password"]
        assert "pw-s3cret" not in repr(loaded.etcd_config(("http://x:1",)))
    # A real process, the secrets in its environment and its file: --help shows neither.
    env = {**os.environ, **environ, "TM_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    for code in (
        "from tm_sidecar.ops._cli import main; main()",
        "from tm_sidecar.ops._tmctl import main; main()",
    ):
        run = subprocess.run(
            [sys.executable, "-c", code, "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "--etcd-password" in run.stdout
        assert "s3cret" not in run.stdout + run.stderr


def test_the_environment_wins_over_the_file_for_the_socket(tmp_path: Path) -> None:
    """The documented order held for every setting but socket_mode and socket_group,
    whose variables the old loader did not know: a file then beat the environment."""
    config = tmp_path / "tm.toml"
    config.write_text('socket_mode = "0600"\nsocket_group = "file-group"\n')
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TM_SOCKET_MODE": "0640",
        "TM_SOCKET_GROUP": "env-group",
    }
    run = subprocess.run(
        [sys.executable, "-m", "tm_sidecar", "--config", str(config), "--print-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert (shown["socket_mode"], shown["socket_group"]) == ("0640", "env-group")


def test_the_operations_guide_shows_the_table_as_it_is() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    begin, end = "<!-- settings table: begin -->\n", "<!-- settings table: end -->"
    shown = text[text.index(begin) + len(begin) : text.index(end)]
    assert shown == markdown_table(), (
        "docs/operations.md's settings table is stale: paste in the output of "
        "python -m tm_sidecar.ops._settings"
    )
