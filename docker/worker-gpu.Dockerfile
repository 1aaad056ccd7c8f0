# A worker with ONNX Runtime's CUDA provider, on NVIDIA's CUDA 13 + cuDNN 9 runtime.
# That base is Ubuntu 24.04, whose Python is 3.12, so Python comes from the same pinned
# official image as the CPU worker's: the build stage installs the venv there and the
# runtime stage copies its /usr/local (CPython 3.11) and the venv in. Nothing is fetched
# at build time but the two pinned base images and the PyPI wheels of worker-gpu.txt;
# no compiler, no package manager cache reaches the runtime image.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t taskmux/worker-gpu .
FROM python:3.11.14-slim-bookworm AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/worker-gpu.txt /tmp/requirements.txt
# redis 8 imports async_timeout, which is not installed, on Python below 3.11.3.
RUN python -c 'import sys; sys.exit(sys.version_info < (3, 11, 3))' \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps --require-virtualenv -r /tmp/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes pip

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TASKMUX_MODEL_REPO=/models \
    TASKMUX_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
# CPython as the official image built it (into /usr/local, against glibc 2.36; Ubuntu 24.04
# has 2.39). The venv's interpreter links to /usr/local/bin/python.
COPY --from=deps /usr/local /usr/local
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY workers /app/workers
COPY router /app/router
COPY taskmux /app/taskmux
COPY model /app/model
COPY client/taskmux_api /app/taskmux_api
# ldconfig finds libpython in /usr/local/lib. The import line fails the build, not the pod,
# if the CUDA base lacks a library the interpreter or a wheel loads. Compiled now: the root
# filesystem is read-only at run time.
RUN ldconfig \
    && python -c 'import ssl, ctypes, numpy, onnxruntime, tokenizers, grpc, redis' \
    && python -m compileall -q /app
USER 10001:10001
EXPOSE 50052
ENTRYPOINT ["python", "-m", "workers"]
