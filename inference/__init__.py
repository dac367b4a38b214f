"""The serving contract: what a model set is, how it is loaded, and what a forecast is.

Training writes what this package reads, and serving reads nothing else:

- ``inference.layout``: the models, their boosters and the columns of each model's output (the
  one table training, the ensemble and the consistency checks read);
- ``inference.registry``: model versions on disk (write, verify, load, promote a set);
- ``inference.transforms``: the pure target transforms and meta-model inputs both sides apply;
- ``inference.ensemble``: the composition of the four models into forecasts;
- ``inference.forecast``: the :class:`Forecast` a client receives.

``deployments`` imports this package and never ``training``; ``training`` imports it and writes
the registry. Importing it has no side effects (no thread settings, no Ray, no pandas).
"""
