# A worker with ONNX Runtime's CPU provider. The model repository is not in the image: it
# comes from the model image (docker/model.Dockerfile), mounted at TASKMUX_MODEL_REPO.
# Build from the repository root:  docker build -f docker/worker-cpu.Dockerfile -t taskmux/worker-cpu .
FROM python:3.11.14-slim-bookworm AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/worker-cpu.txt /tmp/requirements.txt
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
    HOME=/tmp \
    TASKMUX_MODEL_REPO=/models \
    TASKMUX_PROVIDERS=CPUExecutionProvider
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY workers /app/workers
COPY router /app/router
COPY taskmux /app/taskmux
COPY model /app/model
COPY client/taskmux_api /app/taskmux_api
# Compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50052
ENTRYPOINT ["python", "-m", "workers"]
