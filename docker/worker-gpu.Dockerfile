# A worker with ONNX Runtime's CUDA provider, on NVIDIA's CUDA 13 + cuDNN 9 runtime.
# That base is Ubuntu 24.04, whose Python is 3.12, so the build stage installs a
# standalone CPython 3.11 with uv and the runtime stage copies it in; nothing else
# (no compiler, no package manager cache) reaches the runtime image.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t taskmux/worker-gpu .
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS deps
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1
COPY --from=uv /uv /usr/local/bin/uv
COPY docker/requirements/worker-gpu.txt /tmp/requirements.txt
RUN uv python install 3.11.14 \
    && uv venv --python 3.11.14 /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-deps -r /tmp/requirements.txt

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TASKMUX_MODEL_REPO=/models \
    TASKMUX_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY workers /app/workers
COPY router /app/router
COPY taskmux /app/taskmux
# Compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 50052
ENTRYPOINT ["python", "-m", "workers"]
