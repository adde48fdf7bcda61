# serve.py on an ONNX export: Debian's python3 in a venv, requirements-serve.txt, no PyTorch. See README, Deploy.
#   docker build -t cola-serve .          # model/ holds the export (best-....onnx), or nothing
#   docker run -p 8000:8000 cola-serve    # or mount one: -v "$PWD/model:/model:ro"
# The wheels come from PyPI, or, where the context has a wheels/ folder (pip download -r requirements-serve.txt
# -d wheels), from it alone: no network, the same versions every build. wheels/ ends up in no layer.

FROM debian:bookworm-slim AS venv
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
COPY requirements-serve.txt /
RUN --mount=type=bind,target=/context \
    python3 -m venv /venv \
    && if [ -d /context/wheels ]; then source="--no-index --find-links /context/wheels"; fi \
    && /venv/bin/pip install --no-cache-dir $source -r /requirements-serve.txt \
    && /venv/bin/pip uninstall -q -y pip setuptools  # the venv's own, not needed to serve

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --system --no-create-home --shell /usr/sbin/nologin serve
COPY --from=venv /venv /venv
WORKDIR /app
COPY serve.py serve.html inference.py checkpoints.py export.py metrics.py ./
RUN python3 -m compileall -q /app  # the server cannot write its bytecode cache: compiled once here
# The export, read-only to the server; an empty model/ to mount one at run time instead. (COPY, not a bind
# mount: podman's layer cache would not see a changed model.)
COPY model/ /model/
USER serve
# ONNX Runtime >= 1.29 sends usage telemetry (model file names, hashes) from Linux unless this is set.
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD ["python3", "-c", "import json, sys, urllib.request as r; sys.exit(not json.load(r.urlopen('http://127.0.0.1:8000/health', timeout=4))['ready'])"]
# Exec form: python is PID 1 and gets SIGTERM itself (docker stop): uvicorn finishes the requests in flight, then exits.
CMD ["python3", "serve.py", "--checkpoint", "/model", "--host", "0.0.0.0", "--port", "8000"]
