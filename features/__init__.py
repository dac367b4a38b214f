"""Candles, features and labels: one definition for training and serving."""

from features.batch import build_features
from features.incremental import FeatureBuilder
from features.candles import load_candles
from features.indicators import FEATURE_GROUPS, WARMUP, feature_names, feature_set_hash
from features.labels import build_labels

FEATURE_NAMES = feature_names()

__all__ = ["FEATURE_GROUPS", "FEATURE_NAMES", "WARMUP", "FeatureBuilder", "build_features", "build_labels",
           "feature_names", "feature_set_hash", "load_candles"]
