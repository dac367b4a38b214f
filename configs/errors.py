"""The engine's error hierarchy.

It lives in the lowest layer (``configs``, which imports no other project package) because every
package — configs itself, features, inference, training, deployments, scripts — raises or maps
these errors, and a lower layer must never import from a higher one.
The HTTP layer maps each class to a status code (see ``deployments.errors``).
"""

from __future__ import annotations


class MLEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(MLEngineError):
    """A configuration file or setting is invalid; the message names the key."""


class CandleDataError(MLEngineError):
    """Candle data is malformed; the message names the row and the problem."""


class FeatureError(MLEngineError):
    """Features cannot be computed (not enough contiguous history, bad input)."""


class ModelNotFoundError(MLEngineError):
    """No model (or no such version) exists in the registry."""


class ModelLoadError(MLEngineError):
    """A model exists but cannot be trusted: checksum or feature-set mismatch, unreadable file."""


class PredictionError(MLEngineError):
    """A model failed to produce a prediction."""


class MarketDataError(MLEngineError):
    """The market feed is unavailable or stale."""
