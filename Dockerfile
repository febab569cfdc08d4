# syntax=docker/dockerfile:1
# The redemption gateway image: `rgw serve` by default; `rgw writer`, `rgw migrate`... as other arguments.
#   docker build -t redemption-gateway:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9108:9108 -e RGW_CODE_KEYS=... -e RGW_REDIS_URL=... redemption-gateway:0.1.0
# Only the virtualenv (runtime dependencies from requirements-runtime.lock + the project's wheel, without
# gateway/dev) reaches the final image: no compilers, no pip cache, no tests, no dev tooling.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: hash-checked dependencies and the project's wheel, in /opt/venv -------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Build tools (hatchling, the build backend) from the full lock, hash-checked, in a venv thrown away with this
# stage.
COPY requirements.lock ./
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock

# The runtime venv: runtime dependencies only (requirements-runtime.lock: no dev group), hash-checked. No pip
# inside it; the build venv's pip installs into it.
COPY requirements-runtime.lock ./
RUN python -m venv --without-pip /opt/venv \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes --only-binary=:all: \
        -r requirements-runtime.lock

# The project as a wheel (pyproject.toml leaves gateway/dev out of it), installed without dependencies: they are
# all in the lock already.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY risk ./risk
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /wheels/*.whl \
 && /opt/venv/bin/python -c "import gateway.cli, gateway.pb, risk" \
 && ! /opt/venv/bin/python -c "import gateway.dev" 2>/dev/null

# ---- runtime -------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="redemption-gateway" \
      org.opencontainers.image.description="gRPC redemption gateway (rgw)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RGW_GRPC_ADDR=0.0.0.0:50051 \
    RGW_METRICS_ADDR=0.0.0.0:9108 \
    RGW_WRITER_METRICS_ADDR=0.0.0.0:9109 \
    RGW_WRITER_HEALTH_ADDR=0.0.0.0:50052

# An unprivileged user with a fixed numeric id (Kubernetes runAsNonRoot can only verify a numeric USER).
RUN groupadd --system --gid 10001 rgw \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rgw

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /tmp
# gRPC; /metrics (worker i of RGW_WORKERS on 9108+i); the writer's /metrics and gRPC health.
EXPOSE 50051 9108 9109 50052
ENTRYPOINT ["rgw"]
CMD ["serve"]
