"""The floor: a bare FastAPI app that answers ``POST /predictions`` with a fixed dict, one uvicorn process.

No auth, no Redis, no rendering, no model: what the machine and the HTTP stack alone give, so the
shipped engine's cached answer can be compared with it (issue 12: >= 0.5x its throughput, p99 <= 3x).

    python bench/bare_fastapi.py --port 8101
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

# The size and shape of a cached /predictions answer (about 1 kB of JSON).
ANSWER = {"symbol": "BTCUSDT", "horizon": 6, "horizon_minutes": 30, "candle_open_time": 1761304500000,
          "candle_time": "2025-10-24T11:15:00Z", "close": 111237.85, "predicted_high": 111343.84,
          "predicted_high_pct": 0.0953, "predicted_low": 111126.59, "predicted_low_pct": -0.1, "interval": {
              "coverage": 0.8, "high": [111300.1, 111400.2], "low": [111100.3, 111150.4]},
          "model_versions": {"range_predictor": "20261201T104648Z-3105", "tpsl_classifier": "20261201T104648Z-3105",
                             "signal_classifier": "20261201T104648Z-3105", "meta_model": "20261201T104648Z-3105"},
          "cached": True, "data_age_s": 12.5}


def build() -> FastAPI:
    app = FastAPI()

    @app.post("/predictions")
    async def predictions() -> dict:
        return ANSWER

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    uvicorn.run(build(), host="127.0.0.1", port=p.parse_args().port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
