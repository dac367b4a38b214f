# syntax=docker/dockerfile:1
# One image for the Ray head and the Ray workers of the ML Engine (see docs/operations.md).
#
#   docker build -t ml-engine .                          # models mounted at /app/models at run time
#   docker build --target baked -t ml-engine:baked .      # models/ from the build context baked in
#   docker run ml-engine head | worker | job CMD...       # see ops/docker-entrypoint.sh
#
# Every native library the engine needs ships inside its wheels (TA-Lib's C library, XGBoost's
# OpenMP, NumPy's BLAS), so the slim base needs no apt packages at all: smaller image, nothing to
# pin, nothing for a CVE scanner to flag beyond Debian's base.

# ---- dependencies: a virtualenv built once per change of the lock file -------------------------
FROM python:3.11-slim-bookworm AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The pinned set the image runs (`make lock` writes it from pyproject.toml): serving + training
# (the head trains on a fresh volume and runs retrain jobs), without matplotlib or the test tools.
# A serving-only image: --build-arg REQUIREMENTS=requirements/serve.txt (then mount trained models).
ARG REQUIREMENTS=requirements/train.txt
WORKDIR /build
COPY requirements/ requirements/
# Dependencies only, so editing the engine's code reuses this layer instead of reinstalling Ray.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r "${REQUIREMENTS}"

# ---- runtime: non-root, the project on PYTHONPATH, models mounted ------------------------------
FROM python:3.11-slim-bookworm AS runtime
ARG APP_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    MLE_HTTP_HOST=0.0.0.0 \
    MLE_MODELS_DIR=/app/models \
    MLE_SPOOL_DIR=/app/var/spool
RUN groupadd --gid "${APP_UID}" app \
    && useradd --uid "${APP_UID}" --gid app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/models /app/var \
    && chown -R app:app /app
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
# Only what runs: code, configs, the shipped 30-day sample (replay feed, first training) and the
# Serve config. Tests, benchmarks and docs stay out of the image.
COPY --chown=app:app pyproject.toml serve_config.yaml ./
COPY --chown=app:app configs/ configs/
COPY --chown=app:app features/ features/
COPY --chown=app:app training/ training/
COPY --chown=app:app deployments/ deployments/
COPY --chown=app:app scripts/ scripts/
COPY --chown=app:app data/sample/ data/sample/
COPY --chown=app:app --chmod=755 ops/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER ${APP_UID}:${APP_UID}
# 8000 Serve HTTP (the engine's API), 6380 Ray GCS, 8265 dashboard + job API, 8080 Ray metrics.
EXPOSE 8000 6380 8265 8080
VOLUME ["/app/models", "/app/var"]
# Liveness of the engine itself, not just of Ray: the API's health route through the Serve proxy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLE_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["head"]

# ---- baked: the same image with the models/ of the build context inside -----------------------
FROM runtime AS baked
COPY --chown=app:app models/ /app/models/

# ---- default target: runtime (models mounted) ---------------------------------------------------
FROM runtime AS engine
