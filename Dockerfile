# syntax=docker/dockerfile:1
# moshimoshi images. Two targets:
#   docker build --target gateway -t moshimoshi-gateway .   SIP/RTP/WebRTC gateway + API (no torch)
#   docker build --target worker  -t moshimoshi-worker  .   GPU inference worker (torch + moshi)
# Each target installs into a virtualenv in a build stage and copies only that venv into a
# clean runtime stage, so no pip cache or build leftovers end up in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch's PyPI CUDA wheels carry their own CUDA runtime, cuBLAS and cuDNN (nvidia-*-cu12
# wheels), so the worker needs from NVIDIA's image only what the container toolkit reads:
# NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES and the NVIDIA_REQUIRE_CUDA driver
# check. The "-base" flavour has those without a second, unused copy of the CUDA libraries
# (several GiB in "-runtime"); pass CUDA_IMAGE=...-runtime-ubuntu22.04 to use that instead.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
ARG TORCH_VERSION=2.13.0
ARG MOSHI_VERSION=0.2.13
ARG SILERO_VAD_VERSION=6.2.3

# ---------------------------------------------------------------- gateway

FROM ${PYTHON_IMAGE} AS gateway-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/moshimoshi
WORKDIR /src
# The package needs only these (README.md is just its long description: left out, so that
# documentation edits do not invalidate the layers).
COPY pyproject.toml ./
COPY sip ./sip
COPY service ./service
# The [gateway] extra deliberately has no torch: this image stays small and CPU-only.
RUN /opt/moshimoshi/bin/pip install ".[gateway]"

FROM ${PYTHON_IMAGE} AS gateway
LABEL org.opencontainers.image.title="moshimoshi-gateway" \
      org.opencontainers.image.description="SIP/RTP and WebRTC gateway, API and dashboard of moshimoshi" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 moshimoshi \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/moshimoshi --create-home \
      --shell /usr/sbin/nologin moshimoshi
COPY --from=gateway-build /opt/moshimoshi /opt/moshimoshi
ENV PATH=/opt/moshimoshi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/moshimoshi
USER 10001:10001
# SIP (UDP and TCP) and HTTP (API, /metrics, /dashboard, /phone). 5060 needs no
# NET_BIND_SERVICE: it is above 1024.
EXPOSE 5060/udp 5060/tcp 8080/tcp
# RTP: one even port (+ the odd one above it for RTCP) per call from
# MOSHIMOSHI_RTP_PORT_MIN..MOSHIMOSHI_RTP_PORT_MAX (default 20000-30000, UDP). A range is
# too long to list here: publish it explicitly (docker run -p 20000-20999:20000-20999/udp
# with MOSHIMOSHI_RTP_PORT_MAX=20999) or run with --network host, as the Helm chart does.
EXPOSE 20000/udp
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MOSHIMOSHI_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["moshimoshi", "gateway"]

# ---------------------------------------------------------------- worker

FROM ${CUDA_IMAGE} AS worker-base
# Ubuntu 22.04's own Python 3.11 (universe), with venv support; nothing else.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM worker-base AS worker-build
ARG TORCH_VERSION
ARG MOSHI_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3.11 -m venv /opt/moshimoshi
# torch first (its own layer: it is most of the image and changes least), then moshi
# without its declared deps (moshi 0.2.13 pins torch<2.10 but runs on 2.13; its real
# needs are in the [worker] extra), then the project.
# hadolint ignore=DL3059
RUN /opt/moshimoshi/bin/pip install "torch==${TORCH_VERSION}"
# hadolint ignore=DL3059
RUN /opt/moshimoshi/bin/pip install --no-deps "moshi==${MOSHI_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
COPY sip ./sip
COPY service ./service
RUN /opt/moshimoshi/bin/pip install ".[worker]"
# The ASR role (`moshimoshi asr`) runs from this image too: faster-whisper on CTranslate2,
# whose CUDA build finds cuBLAS and cuDNN in the nvidia-* wheels torch brought (see
# LD_LIBRARY_PATH below).
# hadolint ignore=DL3059
RUN /opt/moshimoshi/bin/pip install ".[asr]"
# Silero VAD's weights for the ASR role's voice activity detection (run on onnxruntime):
# the package without its declared dependencies (torch is here anyway, but not needed).
ARG SILERO_VAD_VERSION
# hadolint ignore=DL3059
RUN /opt/moshimoshi/bin/pip install --no-deps "silero-vad==${SILERO_VAD_VERSION}"

FROM worker-base AS worker
LABEL org.opencontainers.image.title="moshimoshi-worker" \
      org.opencontainers.image.description="GPU inference worker of moshimoshi (batched Moshi)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 moshimoshi \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/moshimoshi --create-home \
      --shell /usr/sbin/nologin moshimoshi \
 && mkdir -p /cache/huggingface \
 && chown -R 10001:10001 /cache
COPY --from=worker-build /opt/moshimoshi /opt/moshimoshi
# The Hugging Face cache (model weights, ~15 GiB for a 7B model) lives on its own volume
# so that a restarted container does not download the model again.
ENV PATH=/opt/moshimoshi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/moshimoshi/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/moshimoshi/lib/python3.11/site-packages/nvidia/cudnn/lib
VOLUME ["/cache"]
WORKDIR /home/moshimoshi
USER 10001:10001
# HTTP + WebSocket: /healthz, /readyz, /metrics, /v1/info, /v1/session, POST /v1/drain
# (8082: the same for `moshimoshi asr`, the ASR role, with /v1/asr).
EXPOSE 8081/tcp 8082/tcp
# Loading and warming a 7B model takes minutes; /healthz answers while it loads.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MOSHIMOSHI_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["moshimoshi", "worker"]
