"""Model training, evaluation, the registry and the inference ensemble.

The engine shares a small machine (2 cores) with Ray, Serve and other processes. OpenMP's default
busy-wait policy makes XGBoost's threads spin while waiting for a core and slowed fits ~10x when
the machine was oversubscribed (measured); passive waiting costs nothing when cores are free. It
must be set before XGBoost's OpenMP runtime starts, hence here, before any submodule imports it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
