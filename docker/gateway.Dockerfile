# The gateway: gRPC API in front of the Redis task streams. No torch, no ONNX Runtime.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t taskmux/gateway .
FROM python:3.11.14-slim-bookworm AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/gateway.txt /tmp/requirements.txt
# redis 8 imports async_timeout, which is not installed, on Python below 3.11.3.
RUN python -c 'import sys; sys.exit(sys.version_info < (3, 11, 3))' \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps --require-virtualenv -r /tmp/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes pip

FROM python:3.11.14-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY gateway /app/gateway
COPY router /app/router
COPY taskmux /app/taskmux
COPY model /app/model
COPY client/taskmux_api /app/taskmux_api
# Compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["python", "-m", "gateway"]
