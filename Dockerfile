# Liberty Reach Signaling — production image.
#
#   make docker            # docker build -t liberty-reach/signaling:latest .
#   docker run --rm -p 8080:8080 --tmpfs /tmp/metrics \
#     -e JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')" \
#     -e REDIS_URL=redis://redis.example.internal:6379/0 liberty-reach/signaling:latest
#
# Stage 1 builds the project's wheel and a wheel of every dependency; stage 2 installs them
# from that local wheelhouse only (no index, no compiler, no build tools), then runs as an
# unprivileged user.  Needs BuildKit (the default builder since Docker 23) for RUN --mount.
# tests/deploy/test_image.py checks the properties promised here without a Docker engine.

ARG PYTHON_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------ builder
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Every runtime dependency ships manylinux/musllinux wheels for amd64 and arm64, so no
# compiler is needed here either; on another architecture add build-essential to THIS
# stage only.
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
RUN pip wheel --wheel-dir /wheels . \
 && ls /wheels/liberty_reach_signaling-*.whl

# ------------------------------------------------------------------------------ runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="Liberty Reach Signaling" \
      org.opencontainers.image.description="WebSocket signaling server (Sanic + Redis Streams)" \
      org.opencontainers.image.licenses="AGPL-3.0-or-later"
# PROMETHEUS_MULTIPROC_DIR: worker processes write their samples there; mount a tmpfs
# (docker --tmpfs, compose tmpfs:) or an emptyDir (Kubernetes); the server empties it at
# start.  HEALTHCHECK_URL: what the HEALTHCHECK below probes; change it together with -addr.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics \
    HEALTHCHECK_URL=http://127.0.0.1:8080/health

RUN groupadd --system --gid 10001 signaling \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin signaling

# Install from the builder's wheelhouse, bind-mounted so the wheels never land in a layer.
# The smoke check imports the package, which creates its metrics directory: point it
# elsewhere, or a root-owned /tmp/metrics would stay in the image for user 10001 to trip on.
# (DL3013: no version to pin, the wheelhouse holds exactly one build of everything)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels liberty-reach-signaling \
 && PROMETHEUS_MULTIPROC_DIR=/tmp/build-check signaling-server --help >/dev/null \
 && rm -rf /tmp/build-check

# Numeric, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
# an empty, root-owned working directory (python -m puts it on sys.path)
WORKDIR /srv/signaling
EXPOSE 8080
STOPSIGNAL SIGTERM

# python:*-slim has no curl or wget: probe with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:8080/health'), timeout=2); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["signaling-server"]
CMD ["-addr", ":8080"]
