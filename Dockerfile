# syntax=docker/dockerfile:1
# CPU image by default. For GPU hosts:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg ORT_PACKAGE=onnxruntime-gpu \
#                --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t sluice:cuda .
# TORCH_INDEX_URL: where torch comes from (PyTorch's CPU-only index by default, so the CPU
# image does not carry CUDA libraries). SLUICE_EXTRAS adds optional parts: redis (breaker
# state and serving versions shared by replicas, which deploy/kubernetes turns on), so the
# image carries it unless SLUICE_EXTRAS="" says otherwise.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG ORT_PACKAGE=onnxruntime
ARG SLUICE_EXTRAS="redis"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/sluice \
    PATH=/opt/sluice/bin:$PATH

# CUDA bases ship no Python; the slim Python base already has it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients/python ./clients/python
# The same install as README's quick start (non-editable here), then the ONNX Runtime build
# that matches the base image.
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && pip install ".${SLUICE_EXTRAS:+[$SLUICE_EXTRAS]}" \
    && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then \
        pip uninstall -y onnxruntime && pip install "$ORT_PACKAGE"; \
    fi \
    && useradd --system --uid 10001 --no-create-home sluice

USER 10001
WORKDIR /
# Listening on every interface means admin calls (load, unload, promote, ...) are refused
# until an admin credential is configured: SLUICE_ADMIN__TOKEN, or with mTLS
# SLUICE_ADMIN__IDENTITIES. TLS: mount the files and set SLUICE_TLS__CERT_FILE and
# SLUICE_TLS__KEY_FILE (mTLS: SLUICE_TLS__CLIENT_CA_FILE, SLUICE_TLS__REQUIRE_CLIENT_CERT);
# the health check then needs SLUICE_CA_FILE and SLUICE_SERVER_NAME (mTLS: SLUICE_CERT_FILE,
# SLUICE_KEY_FILE) in the environment too.
ENV SLUICE_HOST=0.0.0.0
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["sluice", "health", "--url", "127.0.0.1:8001"]
ENTRYPOINT ["sluice"]
CMD ["serve"]
