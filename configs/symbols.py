"""Symbol names: real exchange symbols and the synthetic replay symbols made from them.

Why synthetic symbols: the engine must be tested and benchmarked with hundreds of symbols, but
the project ships real candles for two. A synthetic symbol is a time-shifted copy of a shipped
real symbol, served only by the replay feed; its name says that it is synthetic and which real
symbol it came from, so it can never be mistaken for (or sent to) an exchange:

    SYN<kkk><SOURCE>    e.g. SYN001BTCUSDT, SYN042ETHUSDT

``kkk`` is the copy number, 001..999, three digits; ``SOURCE`` the real symbol (it starts with a
letter). Copy ``k`` replays the source's candles on the same timestamps, with the values taken
``k x SYNTHETIC_LAG`` candles later (wrapping around, the wrapped part rescaled so that prices join
up: see :func:`features.synthetic.synthetic_candles`). The name is an ordinary upper-case
alphanumeric symbol, valid wherever the API and the settings validate symbols.

``market.synthetic_symbols: N`` (``MLE_MARKET__SYNTHETIC_SYMBOLS=N``) adds N such names to
``market.symbols``, round-robin over the real symbols listed there: the first copy of each, then
the second, and so on (:func:`synthetic_names`). They can also be listed by name.

No pandas and no project imports here: ``configs.settings`` imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SYNTHETIC_PREFIX = "SYN"
MAX_COPIES = 999  # copies per real symbol (three digits)
# Candles between consecutive copies of one symbol (~8.4 hours, a prime: copies of a 30-day sample
# stay distinct for every copy number up to MAX_COPIES).
SYNTHETIC_LAG = 101
_SYNTHETIC = re.compile(rf"^{SYNTHETIC_PREFIX}(\d{{3}})([A-Z][A-Z0-9]*)$")


def synthetic_name(source: str, copy: int) -> str:
    """``("BTCUSDT", 7)`` -> ``"SYN007BTCUSDT"``."""
    if not 1 <= copy <= MAX_COPIES:
        raise ValueError(f"synthetic copy number {copy} is outside 1..{MAX_COPIES}")
    if is_synthetic(source) or not _SYNTHETIC.match(f"{SYNTHETIC_PREFIX}001{source}"):
        raise ValueError(f"{source!r} cannot be the source of a synthetic symbol (a real symbol starting "
                         "with a letter)")
    return f"{SYNTHETIC_PREFIX}{copy:03d}{source}"


def parse_synthetic(symbol: str) -> tuple[str, int] | None:
    """``"SYN007BTCUSDT"`` -> ``("BTCUSDT", 7)``; None for a real symbol."""
    m = _SYNTHETIC.match(symbol)
    if m is None or int(m[1]) < 1:
        return None
    return m[2], int(m[1])


def is_synthetic(symbol: str) -> bool:
    return parse_synthetic(symbol) is not None


def real_symbol(symbol: str) -> str:
    """The real symbol whose candles ``symbol`` replays (itself for a real symbol)."""
    parsed = parse_synthetic(symbol)
    return symbol if parsed is None else parsed[0]


def synthetic_names(sources: Sequence[str], n: int) -> list[str]:
    """``n`` synthetic names, round-robin over ``sources``: SYN001A, SYN001B, SYN002A, ..."""
    sources = [s for s in sources if not is_synthetic(s)]
    if n <= 0:
        return []
    if not sources:
        raise ValueError("synthetic symbols need at least one real symbol to copy")
    if n > MAX_COPIES * len(sources):
        raise ValueError(f"at most {MAX_COPIES} synthetic copies per real symbol ({MAX_COPIES * len(sources)} "
                         f"for {len(sources)}), asked for {n}")
    return [synthetic_name(sources[i % len(sources)], i // len(sources) + 1) for i in range(n)]


def model_symbol(symbol: str, known: Sequence[str]) -> str:
    """The symbol whose ``symbol_id`` a model uses for ``symbol`` (``known``: the model's symbols).

    The documented default (docs/models.md "Symbols the models were not trained on"): a known
    symbol is itself; a synthetic symbol is its source when the model knows it; any other symbol
    takes the model's first symbol (the first configured symbol at training, BTCUSDT for the
    shipped set). Features are scale-free, so a model trained on a few liquid pairs forecasts
    others with the id of its reference pair rather than refusing them.
    """
    if symbol in known:
        return symbol
    source = real_symbol(symbol)
    return source if source in known else known[0]
