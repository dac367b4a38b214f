"""The model layout, defined once: models -> boosters -> output columns.

Training reads it to know which boosters to fit (``training.boosters.base_specs``), the ensemble to
know which to load and check (``inference.ensemble``), and both turn raw booster outputs into a
model's stage output with the same :func:`inference.transforms.stage_output`. Adding a booster or
an output column is a change here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoosterLayout:
    """One booster of a model: its file-stem target, objective kind and label column prefix."""

    target: str           # file stem prefix: ``high`` -> ``high_h6.ubj``
    kind: str             # "quantile" | "mean" | "binary" | "multiclass"
    label: str            # label column prefix in features.labels (``fut_high`` -> ``fut_high_6``)
    optional: bool = False  # older model sets may lack it; its output columns are then NaN

    @property
    def width(self) -> int:
        """Columns of the booster's raw prediction (three quantiles or three classes, else one)."""
        return 3 if self.kind in ("quantile", "multiclass") else 1


# Column order of each model's stage output (``Ensemble.predict_stage``).
RANGE_OUTPUTS: tuple[str, ...] = ("high_lower", "high_median", "high_upper", "low_lower", "low_median", "low_upper")
# The range predictor's stage output also carries the mean forecasts (squared-error boosters; NaN
# for a model set trained without them). The meta-model sees only RANGE_OUTPUTS.
RANGE_MEAN_OUTPUTS: tuple[str, ...] = ("high_mean", "low_mean")
TPSL_OUTPUTS: tuple[str, ...] = ("p_tp_long", "p_tp_short")
SIGNAL_OUTPUTS: tuple[str, ...] = ("p_sell", "p_hold", "p_buy")
# The meta-model's stage output (meta-labelling): its raw probability that the primary's proposed
# trade makes net R > 0 after costs, then that probability calibrated (``p_win``).
META_OUTPUTS: tuple[str, ...] = ("p_win_raw", "p_win")

META_MODEL = "meta_model"
MODELS: dict[str, tuple[BoosterLayout, ...]] = {
    "range_predictor": (BoosterLayout("high", "quantile", "fut_high"), BoosterLayout("low", "quantile", "fut_low"),
                        BoosterLayout("high_mean", "mean", "fut_high", optional=True),
                        BoosterLayout("low_mean", "mean", "fut_low", optional=True)),
    "tpsl_classifier": (BoosterLayout("tp_long", "binary", "tp_long"), BoosterLayout("tp_short", "binary", "tp_short")),
    "signal_classifier": (BoosterLayout("signal", "multiclass", "signal"),),
    # P(net R > 0 | the primary's proposal); its label is derived from the signal labels (training.meta_label)
    META_MODEL: (BoosterLayout("meta", "binary", "signal"),),
}
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {"range_predictor": RANGE_OUTPUTS + RANGE_MEAN_OUTPUTS,
                                              "tpsl_classifier": TPSL_OUTPUTS, "signal_classifier": SIGNAL_OUTPUTS,
                                              META_MODEL: META_OUTPUTS}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
BASE_MODELS: tuple[str, ...] = tuple(m for m in MODEL_NAMES if m != META_MODEL)


def booster_name(target: str, horizon: int, symbol: str | None = None) -> str:
    """File stem of one booster: ``high_h6``, ``tp_long_h18``, ``meta_h72`` (``..__BTCUSDT`` per symbol)."""
    return f"{target}_h{horizon}" + (f"__{symbol}" if symbol else "")


def expected_boosters(model: str, horizons: tuple[int, ...] | list[int], symbols: list[str] | tuple[str, ...],
                      per_symbol: bool, include_optional: bool = False) -> set[str]:
    """Booster file stems a complete model set holds for ``model``."""
    per = list(symbols) if per_symbol else [None]
    return {booster_name(b.target, int(h), s) for b in MODELS[model] if include_optional or not b.optional
            for h in horizons for s in per}
