"""The Dockerfile: hadolint passes, and its install steps give a working entrypoint.

No container engine runs here, so the test performs the Dockerfile's pip step in a fresh
virtualenv and starts the entrypoint it names, then runs the HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

from tm_sidecar.ops._embedded import EtcdProcess

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _healthcheck_script() -> str:
    line = next(ln for ln in DOCKERFILE.splitlines() if '"CMD"' in ln or "CMD [" in ln)
    command = json.loads(line.split("CMD", 1)[1].strip())
    assert command[:2] == ["python", "-c"]
    return str(command[2])


def test_the_dockerfile_install_runs(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    assert 'ENTRYPOINT ["tm-sidecar"]' in DOCKERFILE
    src = tmp_path / "src"
    src.mkdir()
    # The Dockerfile's COPY lines: the SDK's package (the protocol), then the sidecar's.
    no_cache = shutil.ignore_patterns("__pycache__")
    (src / "sdk").mkdir()
    for name in ("pyproject.toml", "LICENSE"):
        shutil.copy(ROOT / "sdk" / name, src / "sdk")
    shutil.copytree(ROOT / "sdk" / "taskmanager", src / "sdk" / "taskmanager", ignore=no_cache)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "tm_sidecar", src / "tm_sidecar", ignore=no_cache)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run(
        [
            str(env_dir / "bin" / "pip"),
            "install",
            "--no-cache-dir",
            "-q",
            str(src / "sdk"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    sock = tmp_path / "run" / "tm.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
        "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
        "TM_SOCKET": str(sock),
        "TM_DATA_DIR": str(tmp_path / "data"),
        "TM_LOG_FORMAT": "json",
        "TM_ETCD": etcd_server.endpoint,
        "TM_NAMESPACE": "docker",
    }
    proc = subprocess.Popen(["tm-sidecar"], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        health = subprocess.CompletedProcess[str]([], 1)
        while health.returncode != 0:
            assert proc.poll() is None
            assert time.monotonic() < deadline, health.stderr
            time.sleep(0.2)
            health = subprocess.run(
                [str(env_dir / "bin" / "python"), "-c", _healthcheck_script()],
                env=env,
                capture_output=True,
                text=True,
                timeout=10,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert code == 0, log[-2000:]
    first = json.loads(log.splitlines()[0])  # JSON logs, one object per line
    assert first["logger"].startswith("tm_sidecar")
