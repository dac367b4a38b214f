#!/usr/bin/env bash
# Entrypoint of the ML Engine image (Dockerfile): one image, three roles.
#
#   head            Ray head (GCS on 6380, dashboard/job API on 8265, metrics on 8080), then the
#                   Serve graph from serve_config.yaml via `serve deploy`; stays up while Ray does.
#   worker          a Ray worker joining $RAY_HEAD_ADDRESS (host:6380); Serve places replicas on it.
#   anything else   run as a command, e.g. `python -m training.retrain --no-download`.
#
# Settings come from MLE_* environment variables (docs/configuration.md); Ray's processes inherit
# them, so every replica sees the same configuration.
set -euo pipefail

# Ray 2.5x uses token auth; `serve` (unlike `ray`) only sends the token when the mode is explicit.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
RAY_PORT="${MLE_RAY_PORT:-6380}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
METRICS_PORT="${RAY_METRICS_EXPORT_PORT:-8080}"
SERVE_CONFIG="${SERVE_CONFIG:-/app/serve_config.yaml}"

log() { printf '%s entrypoint: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

ray_pid=""
shutdown() {
  # Stops only this container's own Ray (it is the only one in this PID namespace).
  local code="${1:-0}"
  log "stopping Ray"
  # Within Docker's default 10 s grace (docker stop), so Ray stops itself before the SIGKILL.
  ray stop --grace-period 6 >/dev/null 2>&1 || true
  if [[ -n "$ray_pid" ]]; then wait "$ray_pid" 2>/dev/null || true; fi
  exit "$code"
}

ensure_models() {
  # A head without models would deploy a graph that can only answer 503: fail early and say why,
  # unless asked to train the shipped 30-day sample (like `make serve` does on a fresh checkout).
  if python -m inference.registry list >/dev/null 2>&1 \
      && [[ -n "$(find "${MLE_MODELS_DIR:-/app/models}" -name current -print -quit 2>/dev/null)" ]]; then
    return 0
  fi
  if [[ "${ENGINE_TRAIN_IF_MISSING:-0}" == "1" ]]; then
    log "no models in ${MLE_MODELS_DIR:-/app/models}; training on the shipped sample"
    python -m training.train --candles data/sample/BTCUSDT_5m.parquet data/sample/ETHUSDT_5m.parquet \
      --out "${MLE_MODELS_DIR:-/app/models}"
    return 0
  fi
  log "no models in ${MLE_MODELS_DIR:-/app/models}: mount a trained set there, build the 'baked'" \
      "target, or set ENGINE_TRAIN_IF_MISSING=1"
  exit 2
}

deploy_serve() {
  local attempt rendered=/tmp/serve_config.deployed.yaml
  # The committed config with http_options from MLE_HTTP_HOST / MLE_HTTP_PORT (0.0.0.0 in this image:
  # the published port must reach HAProxy, not only the container's loopback) and the fast-ingress
  # switches from this environment.
  python -m deployments.launcher --config "$SERVE_CONFIG" --print-config > "$rendered"
  for attempt in $(seq 1 60); do
    if serve deploy "$rendered" --address "http://127.0.0.1:${DASHBOARD_PORT}"; then
      log "serve deploy $SERVE_CONFIG (as $rendered): accepted (attempt $attempt)"
      return 0
    fi
    sleep 2
  done
  log "serve deploy never succeeded"
  return 1
}

role="${1:-head}"
case "$role" in
  head)
    ensure_models
    trap shutdown TERM INT
    ray start --head --port="$RAY_PORT" --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT" \
      --metrics-export-port="$METRICS_PORT" --disable-usage-stats --block &
    ray_pid=$!
    deploy_serve || shutdown 1
    wait "$ray_pid"
    ;;
  worker)
    : "${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS=host:${RAY_PORT} for a worker}"
    trap shutdown TERM INT
    ray start --address="$RAY_HEAD_ADDRESS" --metrics-export-port="$METRICS_PORT" \
      --disable-usage-stats --block &
    ray_pid=$!
    wait "$ray_pid"
    ;;
  *)
    exec "$@"
    ;;
esac
