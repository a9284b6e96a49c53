# syntax=docker/dockerfile:1
#
# seqguard service image: FastAPI + ONNX Runtime (CUDA when a GPU is there, CPU otherwise).
# No PyTorch: the package is installed without its `train` extra.
#
#   docker build -t seqguard:0.1.0 .
#   docker run --rm -p 8000:8000 seqguard:0.1.0                 # CPU, embedded Redis
#   docker run --rm --gpus all -p 8000:8000 -e SEQGUARD_REDIS_URL=redis://HOST:6379/0 seqguard:0.1.0
#
# Base image. onnxruntime-gpu 1.31.1, the pin in .constraints.txt, is built for CUDA 13.0
# and cuDNN 9: its CUDA provider links libcublas(Lt).so.13, libcudart.so.13 and
# libcurand.so.10 and loads libcudnn.so.9 (build_and_package_info.cuda_version == "13.0").
# NVIDIA's CUDA 13.0 runtime image with cuDNN 9 carries exactly those libraries. A GPU host
# needs an NVIDIA driver >= 580 (CUDA 13) and the NVIDIA Container Toolkit. Without a GPU
# the same image serves on ONNX Runtime's CPU provider.
#
# Python. .constraints.txt was frozen on CPython 3.11, and every pin the service needs
# has a cp311 manylinux wheel (none is built from source), so the image runs CPython 3.11
# from the deadsnakes PPA: Ubuntu 22.04 ships 3.10, and deadsnakes supports 3.11 on jammy.
# The builder and the runtime both start from the `base` stage below, so the venv's
# interpreter (/usr/bin/python3.11) is at the same path in both.

FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04 AS base
ARG DEBIAN_FRONTEND=noninteractive
# software-properties-common only adds the PPA; it is purged in the same layer.
# ca-certificates is named so that the purge's autoremove keeps it (apt needs it for the PPA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 --version

# ---------------------------------------------------------------------------------------
FROM base AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md .constraints.txt ./
COPY app ./app
COPY model_export ./model_export
# The service only (no `train` extra), every version held to the frozen constraints.
RUN /opt/venv/bin/pip install -c .constraints.txt .
# Fail the build, not the first request: the installed package (not /src) must import,
# carry the default bundle as package data, and come without PyTorch.
WORKDIR /
RUN /opt/venv/bin/python -c "import importlib.resources as r; \
assert (r.files('app') / 'bundles/default/model.onnx').is_file(), 'default bundle missing'; \
assert (r.files('app') / 'bundles/default/bundle.json').is_file(), 'bundle.json missing'" \
 && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch installed'" \
 && /opt/venv/bin/python -c "import onnxruntime, app.settings, app.cli" \
 && /opt/venv/bin/seqguard --help > /dev/null

# ---------------------------------------------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="seqguard" \
      org.opencontainers.image.description="Real-time anomaly scoring of e-commerce user event sequences" \
      org.opencontainers.image.licenses="Apache-2.0"

# SEQGUARD_* are read by app/settings.py. `seqguard serve` with no flags takes host, port
# and workers from them; several workers share metrics through prometheus-client's
# multiprocess mode, whose files live in PROMETHEUS_MULTIPROC_DIR (emptied at start by the
# entrypoint, as the client requires).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SEQGUARD_HOST=0.0.0.0 \
    SEQGUARD_PORT=8000 \
    SEQGUARD_WORKERS=2 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus

# A fixed non-root uid; its home is the working directory, where an embedded Redis (no
# SEQGUARD_REDIS_URL) keeps its data under var/redis.
RUN groupadd --system --gid 10001 seqguard \
 && useradd --system --uid 10001 --gid seqguard --home-dir /srv/seqguard --create-home \
        --shell /usr/sbin/nologin seqguard \
 && mkdir -p /tmp/prometheus \
 && chown seqguard:seqguard /tmp/prometheus

COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/seqguard-entrypoint

WORKDIR /srv/seqguard
USER seqguard
EXPOSE 8000

# Liveness through Python's urllib (no curl in the image); urlopen raises on non-2xx.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SEQGUARD_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/bin/sh", "/usr/local/bin/seqguard-entrypoint"]
CMD ["seqguard", "serve"]
