"""Python client of the ML Engine: typed HTTP calls (:class:`MLEngineClient`, :class:`AsyncMLEngineClient`)
and the ``signals:{symbol}`` subscriber (:mod:`ml_engine_client.subscriber`). The models are the API's own
(:mod:`ml_engine_client.models`): deployments/api.py declares them as its response models."""

from ml_engine_client.client import OPERATIONS, AsyncMLEngineClient, MLEngineClient, MLEngineError, parse_retry_after
from ml_engine_client.models import (HealthDetailedResponse, IndicatorsResponse, ModelsStatusResponse,
                                     PredictionResponse, SignalMessage, SignalResponse)

__all__ = ["OPERATIONS", "AsyncMLEngineClient", "MLEngineClient", "MLEngineError", "parse_retry_after",
           "HealthDetailedResponse", "IndicatorsResponse", "ModelsStatusResponse", "PredictionResponse",
           "SignalMessage", "SignalResponse"]
