"""The lab: what tests, drills, checks and benchmarks run against instead of production.

Real services of one's own (``services``: a private PostgreSQL and Redis, throw-away databases), a
fake Binance on loopback serving real candles (``fake_binance``) and a small model set trained on
the shipped sample (``models``). Scripts import these from here; the test suite imports them too,
and scripts never import ``tests/`` (tests/test_layering.py).
"""
