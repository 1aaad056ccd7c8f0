# The model repository, built once by a job of its own: the only place torch is needed.
# Stage "build" installs the export tools (CPU torch) and runs `taskmux model build`;
# the final image holds only the finished repository (manifest with SHA-256 checksums,
# ONNX encoder, tokenizer, heads) and busybox's cp, which the workers' init container
# runs to copy it into their pod (k8s/base/worker.yaml).
# No int8: it is calibrated on ../shared/data, which is outside the build context, and
# `auto` runs fp32 on CPU (README, Performance); workers asking for int8 are refused.
# Build from the repository root:  docker build -f docker/model.Dockerfile -t taskmux/model .
FROM python:3.11.14-slim-bookworm AS build
# CPU-only torch; from PyPI alone pip would pick the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY router /src/router
COPY workers /src/workers
COPY taskmux /src/taskmux
COPY model /src/model
COPY client /src/client
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" /src/client "/src[export]" \
    && /opt/build/bin/taskmux model build --out /model-repo --variants fp16

FROM busybox:1.37.0
COPY --from=build /model-repo /model-repo
USER 10001:10001
ENTRYPOINT ["cp", "-R", "/model-repo/.", "/models/"]
