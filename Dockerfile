# tm-sidecar: one container per host (or per pod), sharing its socket through a volume.
FROM python:3.11.10-slim-bookworm

# The app's files go in with the same pip steps tests/ops/test_docker.py performs.
RUN groupadd --system --gid 10001 tm \
    && useradd --system --uid 10001 --gid tm --home-dir /var/lib/tm-sidecar --shell /usr/sbin/nologin tm \
    && python -m venv /opt/tm-sidecar \
    && install -d -o tm -g tm -m 0750 /var/lib/tm-sidecar \
    && install -d -o tm -g tm -m 0755 /run/tm-sidecar

# The SDK's package first: the sidecar depends on it for the protocol (taskmanager.protocol).
COPY sdk/pyproject.toml sdk/LICENSE /src/sdk/
COPY sdk/taskmanager /src/sdk/taskmanager
COPY pyproject.toml README.md LICENSE /src/
COPY tm_sidecar /src/tm_sidecar
RUN /opt/tm-sidecar/bin/pip install --no-cache-dir /src/sdk /src && rm -rf /src

ENV PATH=/opt/tm-sidecar/bin:$PATH \
    TM_SOCKET=/run/tm-sidecar/tm.sock \
    TM_DATA_DIR=/var/lib/tm-sidecar \
    TM_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1

USER 10001:10001
# Application containers mount the same volume and set TM_SOCKET=/run/tm-sidecar/tm.sock.
VOLUME ["/run/tm-sidecar", "/var/lib/tm-sidecar"]

# Healthy while the sidecar answers on its socket.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import json,os,socket;s=socket.socket(socket.AF_UNIX);s.settimeout(2);s.connect(os.environ['TM_SOCKET']);s.sendall(b'{\"id\":1,\"op\":\"hello\",\"version\":1}\\n');assert json.loads(s.recv(65536).split(b'\\n')[0])['ok']"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tm-sidecar"]
