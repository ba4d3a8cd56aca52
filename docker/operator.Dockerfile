# The operator image: the optimist package without the model stack (no torch, no CUDA), non-root.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/optimist-serving/operator:0.1.0 .
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY operator/ operator/
# --no-deps: the operator needs only these, not torch and the serving stack
RUN pip install --no-deps . \
 && pip install "numpy>=1.26" "kopf>=1.38" "kubernetes>=30" "jsonschema>=4.18" "cel-python>=0.2" \
 && rm -rf /src

RUN groupadd --gid 10001 optimist && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin optimist
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["optimist"]
CMD ["operator", "--liveness=http://0.0.0.0:8080/healthz"]
