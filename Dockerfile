# allocd container image: wheels are built in the first stage, the runtime stage gets only a virtualenv.
#
#   docker build -t allocd .                      (or `make image`, which builds with buildah from a local base)
#   docker run --rm allocd --version
#   docker run --rm -v "$PWD/allocd.toml:/etc/allocd/allocd.toml:ro" -e ALLOCD_API_KEY allocd run -c /etc/allocd/allocd.toml
#
# BASE must provide python3 (>= 3.11) with the venv module; the default is the official slim image. Both
# stages use the same base, so the virtualenv's interpreter path is valid in the runtime stage.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
# Third-party wheels first (cached while only the code changes), then allocd's own wheel.
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN python3 -m pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python3 -m venv /opt/allocd \
    && /opt/allocd/bin/python3 -m pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl \
    && /opt/allocd/bin/python3 -m pip uninstall --yes pip \
    && /opt/allocd/bin/allocd --version

FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="allocd" \
      org.opencontainers.image.description="Streaming aggregation daemon for CloudZero allocation telemetry" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}"

# A fixed non-root UID/GID, so Kubernetes' runAsNonRoot can verify it and volume ownership is predictable.
# /var/lib/allocd holds the sidecar spool (mount a volume there: the root filesystem is read-only in the chart).
RUN groupadd --system --gid 10001 allocd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/allocd --shell /usr/sbin/nologin allocd \
    && mkdir -p /var/lib/allocd/spool /etc/allocd \
    && chown -R 10001:10001 /var/lib/allocd

COPY --from=build /opt/allocd /opt/allocd

ENV PATH="/opt/allocd/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/lib/allocd
# Metrics, /healthz and /readyz (server.port). The sidecar's HTTP ingest (8125) listens on 127.0.0.1 only.
EXPOSE 9464
# Exec form: allocd is PID 1 and receives SIGTERM itself (it installs its own handler and drains).
STOPSIGNAL SIGTERM
ENTRYPOINT ["allocd"]
CMD ["run"]
