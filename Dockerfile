# The Processor: `processor run` (the supervisor and its SHARDS shards) as the container's
# main process. Configured only by environment variables (SPEC §4); see docker-compose.yml.
#
#   docker build -t processor .
#
# Two stages: the first installs the project and its dependencies into a virtualenv (all
# of them ship manylinux wheels, so no compiler is needed); the second copies that
# virtualenv onto a clean slim image. Plain COPY/RUN only, so the classic builder works too.
#
# Reproducible: both stages start from the same exact Python release on the same Debian
# (an exact tag; add `@sha256:<digest>` from `docker buildx imagetools inspect <tag>` to
# pin the bytes too), and every dependency comes from requirements.lock, exact versions
# with the hashes of their files (`make lock` regenerates it; see README). pip refuses any
# file whose hash is not in the lock, and builds the project itself with the locked
# setuptools, fetching nothing else.

FROM python:3.11.15-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml ./
COPY common/ common/
COPY ops/ ops/
COPY supervisor/ supervisor/
COPY shard/ shard/
COPY migrations/ migrations/
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11.15-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PANIC_DIR=/app/panic
RUN groupadd --system --gid 10001 processor \
    && useradd --system --uid 10001 --gid processor --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin processor \
    && mkdir -p /app/panic \
    && chown -R processor:processor /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Panic dumps (SPEC §5) outlive the container's restarts; each container gets its own.
VOLUME ["/app/panic"]
USER 10001:10001

# /healthz and /metrics (SPEC §6), served by the supervisor on HTTP_PORT.
EXPOSE 8080
# SIGTERM drains within DRAIN_TIMEOUT_S (default 20) + 4 s (STOP_MARGIN_S) and exits 0: give the container
# a stop grace period above that (docker run --stop-timeout 30, or compose's stop_grace_period).
STOPSIGNAL SIGTERM
# slim has no curl: ask with Python. An HTTP 503 (or no answer) raises, so the check fails.
# The empty ProxyHandler keeps an operator's HTTP_PROXY from routing this to a proxy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '8080'), timeout=4)"]
CMD ["processor", "run"]
