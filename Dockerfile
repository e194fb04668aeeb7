# syntax=docker/dockerfile:1
#
# advserve image, CPU (default) or CUDA, from one Dockerfile:
#
#   docker build -t advserve:cpu .
#   docker build --build-arg BASE=cuda -t advserve:cuda .
#
# BASE=cpu  python:3.11-slim; torch from the PyTorch CPU index (no CUDA libraries, a small image).
# BASE=cuda nvidia/cuda *base* flavour + Ubuntu's python3.11; torch from PyPI, whose Linux x86_64 wheel is
#           the CUDA build and brings its own CUDA libraries (cuBLAS, cuDNN, ... as nvidia-* wheels). The
#           nvidia/cuda "runtime" flavour would duplicate those (gigabytes); "base" only adds libcudart and
#           the NVIDIA_* variables the NVIDIA container toolkit reads (NVIDIA_REQUIRE_CUDA refuses to start
#           on a driver too old for that CUDA). Keep its CUDA version that of the torch build in
#           constraints.txt (torch 2.13.0 on PyPI: CUDA 13.0; check with `python -c "import torch;
#           print(torch.version.cuda)"` in the image).
#
# Both flavours run scripts/install.sh, the same script `make venv` runs (there --editable; here no option:
# the runtime, regular installs, no test tools), into /opt/venv in a builder stage; the final stage copies
# only that venv onto the same base, so the venv's interpreter path holds.
# Configuration: every ADVSERVE_* environment variable of `advserve serve` (README, Configuration).
# Memory allocator: nothing to set; the server raises glibc's mmap/trim thresholds itself (mallopt).
# CPU kernels: compiled at build into NUMBA_CACHE_DIR (the builder's CPU; another CPU recompiles them once).

ARG BASE=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04

FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 22.04's python3.11 (jammy-updates); python3.11-venv for ensurepip in the builder (a few MB).
# Not version-pinned (DL3008): jammy-updates replaces its python3.11 package with each security fix, so
# an exact pin would stop building; the base image tag pins the distribution.
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A stage of this file picked by BASE, not a registry image: there is no tag to pin.
# hadolint ignore=DL3006
FROM base-${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM base AS builder
ARG BASE
# numba's cache of the CPU kernels (scripts/install.sh compiles them, advserve.kernels.cpu.warm): a directory
# of its own, copied to the final stage and writable there, since numba only uses a cache it can write to
ENV NUMBA_CACHE_DIR=/opt/numba-cache
# Where torch comes from: "auto" is the PyTorch CPU index for BASE=cpu and pip's usual index (PyPI: the
# CUDA build) for BASE=cuda; any other value is used as given, empty meaning pip's usual index.
ARG TORCH_INDEX_URL=auto
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY scripts/install.sh scripts/
COPY client client
COPY service service
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$TORCH_INDEX_URL" = auto ]; then \
        if [ "$BASE" = cpu ]; then TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu; else TORCH_INDEX_URL=; fi; \
    fi \
    && PYTHON=python3.11 TORCH_INDEX_URL="$TORCH_INDEX_URL" scripts/install.sh /opt/venv

FROM base
RUN groupadd --gid 10001 advserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin advserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /opt/numba-cache /opt/numba-cache
ENV NUMBA_CACHE_DIR=/opt/numba-cache \
    PATH=/opt/venv/bin:$PATH \
    ADVSERVE_HOST=0.0.0.0
# numeric, so that runtimes (Kubernetes runAsNonRoot) can check it is not root
USER 10001:10001
WORKDIR /home/advserve
# REST (http_port), gRPC (grpc_port)
EXPOSE 8000 8001
# Readiness on loopback (/health/* needs no token). Follows ADVSERVE_HTTP_PORT and ADVSERVE_TLS_CERT (https,
# certificate not verified: it is our own process) when set by environment, not --http-port/--tls-cert
# arguments; with mTLS (ADVSERVE_TLS_CLIENT_CA) give `docker run` a --health-cmd that has a client certificate.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('ADVSERVE_TLS_CERT')); urllib.request.urlopen('%s://127.0.0.1:%s/health/ready' % ('https' if tls else 'http', os.environ.get('ADVSERVE_HTTP_PORT', '8000')), timeout=4, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["advserve", "serve"]
