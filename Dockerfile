# Collaborative Memory Network service: two targets from one file.
#
#   api      serving only: model/, app/ (with /dashboard's Chart.js, built by
#            npm in the `dashboard` stage) and the `serve` extra (also what a
#            plain `docker build .` produces: see the last stage)
#   trainer  api + training/ and the `train` extra
#
#   docker build --target api     -t cmn-service:api .
#   docker build --target trainer -t cmn-service:trainer .
#
# Both run their command through docker/entrypoint.sh, which hands libpq the PostgreSQL password a file names
# (PGPASSWORD_FILE; docker-compose.yml's secrets volume) and, in the api image, creates the key file on first
# start. libpq itself comes inside psycopg's binary wheel, so the images need no system PostgreSQL package.
#
# Secure by default: `docker run -p 8000:8000 -v cmn-data:/data cmn-service:api` listens on 0.0.0.0 with auth on.
# The key file is CMN_AUTH_FILE=/data/auth-keys; when it is missing the entrypoint creates it with one key of
# every scope and prints that key once (`docker logs`), and never replaces it (docker/init-secrets.sh). To serve
# without keys, say so: -e CMN_AUTH_FILE= (the server then warns that its API is open).
#
# Every Python dependency comes from a lock with hashes (docker/*.lock, made with
# pip-compile --generate-hashes; docs/deploy.md, "Dependency locks"), installed with
# --require-hashes --no-deps: a package that changed on the index, or one the
# lock does not name, fails the build.
#
# CPU by default (torch from docker/torch-cpu.lock). For a GPU image pass a CUDA
# base, a CUDA torch index and TORCH_LOCKED=0, e.g.
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#   --build-arg TORCH_LOCKED=0
# (a base without Python gets python3 + venv from its apt; see docs/deploy.md).
#
# Only classic Dockerfile syntax is used (no BuildKit-only flags, no syntax
# directive) so that the legacy builder used by docker-compose v1 builds it too.

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------
# dashboard: /dashboard's chart library (Chart.js) from npm: `npm ci`
# (versions and integrity hashes from package-lock.json), then `npm run build`
# copies it into static/vendor/. Only that file enters the api image. Node and
# npm come from the base's own apt (Debian's, Ubuntu's): no Node base image.
# --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS dashboard
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm ca-certificates; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY app/dashboard/package.json app/dashboard/package-lock.json ./
RUN npm ci --no-audit --no-fund && npm run build

# --------------------------------------------------------------------------
# python: the base plus a Python that can make a venv, and the service user
# --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS python

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8

# python:3.11-slim already has Python; CUDA runtime images (Ubuntu) do not.
RUN set -eux; \
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 --version

# A fixed, unprivileged uid/gid so a named volume keeps the same owner across
# the trainer and api images (and across rebuilds).
RUN set -eux; \
    groupadd --system --gid 10001 cmn; \
    useradd --system --uid 10001 --gid cmn --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin cmn; \
    mkdir -p /app /data /secrets; \
    chown cmn:cmn /data /secrets; \
    chmod 700 /secrets

# --------------------------------------------------------------------------
# deps: a venv with torch and the serving dependencies (no project source, so
# this layer is rebuilt only when a lock or a build arg changes)
# --------------------------------------------------------------------------
FROM python AS deps

# 1: torch and its dependencies from docker/torch-cpu.lock (hash-checked; the
# CPU build, which PyPI does not carry: the CPU index below, or a local wheel).
# 0: torch==TORCH_VERSION from TORCH_INDEX_URL, checked by version only (a CUDA
# build, whose wheels no lock here describes).
ARG TORCH_LOCKED=1
ARG TORCH_VERSION=2.13.0
# searched besides pip's configured sources (empty: those alone; a machine
# without this index, such as ../shared/tools/docker-local.sh's, loses ~20 s to
# retries and then finds torch in its local wheels)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The project itself is never pip-installed: the images run it from /app, so
# only dependencies live in the venv.
COPY docker/torch-cpu.lock docker/requirements-api.lock docker/requirements-train.lock /opt/requirements/
RUN set -eux; \
    if [ "$TORCH_LOCKED" = 1 ]; then \
        pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} --require-hashes --no-deps \
            -r /opt/requirements/torch-cpu.lock; \
    else \
        pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"; \
    fi; \
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; \
    pip install --require-hashes --no-deps -r /opt/requirements/requirements-api.lock; \
    pip check

# --------------------------------------------------------------------------
# api: what serving needs at run time, nothing else
# --------------------------------------------------------------------------
FROM python AS api

COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /opt/requirements /opt/requirements

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    CMN_HOST=0.0.0.0 \
    CMN_PORT=8000 \
    CMN_DEVICE=auto \
    CMN_CHECKPOINT=/data/model.ckpt \
    CMN_FEEDBACK_PATH=/data/feedback.sqlite3 \
    CMN_AUTH_FILE=/data/auth-keys \
    CREATE_AUTH_FILE=1

WORKDIR /app
COPY docker/entrypoint.sh /usr/local/bin/cmn-entrypoint
COPY docker/init-secrets.sh /usr/local/bin/cmn-init-secrets
COPY model/ /app/model/
COPY app/ /app/app/
COPY --from=dashboard /build/static/vendor/ /app/app/dashboard/static/vendor/

USER cmn
EXPOSE 8000

# runs CMD (or compose's command) after handing libpq the PostgreSQL password PGPASSWORD_FILE names, if set;
# through sh, so the file needs no executable bit in the build context
ENTRYPOINT ["/bin/sh", "/usr/local/bin/cmn-entrypoint"]

# curl is not in python:3.11-slim; urlopen raises (exit 1) on anything but 2xx
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CMN_PORT', '8000'), timeout=4)" || exit 1

CMD ["python", "-m", "app"]

# --------------------------------------------------------------------------
# trainer: api + training/ and the `train` extra (scipy, tqdm, matplotlib)
# --------------------------------------------------------------------------
FROM api AS trainer

USER root
RUN pip install --require-hashes --no-deps -r /opt/requirements/requirements-train.lock && pip check
COPY training/ /app/training/
USER cmn

ENV CMN_DATA=synthetic \
    CREATE_AUTH_FILE=0 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

# a one-shot job, not a server
HEALTHCHECK NONE
# `docker run -v cmn-data:/data cmn-service:trainer` trains the built-in synthetic
# data set (or $CMN_DATA) on everything and writes /data/model.ckpt
CMD ["sh", "-c", "exec python -m training train --data \"$CMN_DATA\" --out \"$CMN_CHECKPOINT\" --holdout none --quiet"]

# --------------------------------------------------------------------------
# a plain `docker build .` (no --target) yields the api image
# --------------------------------------------------------------------------
FROM api AS default
