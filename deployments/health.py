"""The verdicts of /health/detailed: one state per component, the overall status derived from all.

Why one table: the overall status is what alerting and people read first; when a component's
trouble (the log writer spooling, a full disk, a reconnecting feed) is visible only deep in the
body, "ok" lies. Each component reports a short state, :func:`overall` maps every state to ok,
degraded or down with :data:`OK_STATES` / :data:`DOWN_STATES`, and a component added later (a
field in ``components``) takes part without touching the rule: anything not known to be fine
degrades.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

Overall = Literal["ok", "degraded", "down"]

OK_STATES: dict[str, frozenset[str]] = {
    "models": frozenset({"up"}),
    "cache": frozenset({"up", "disabled"}),
    "database": frozenset({"up", "not_configured"}),
    "log": frozenset({"up", "not_configured"}),
    "market": frozenset({"ok"}),
    "feed": frozenset({"ok"}),
}
# States that mean the engine cannot answer at all (the rest of the not-ok states only degrade it).
DOWN_STATES: dict[str, frozenset[str]] = {
    "models": frozenset({"down"}),
    "market": frozenset({"stale"}),
}
# Per-symbol feed states that degrade (the feed's own words; "stale" comes with the ops health).
FEED_TROUBLE = frozenset({"reconnecting", "error", "unreachable", "stale", "stalled"})


def overall(components: Mapping[str, str]) -> Overall:
    if any(state in DOWN_STATES.get(name, ()) for name, state in components.items()):
        return "down"
    if any(state not in OK_STATES.get(name, frozenset({"ok", "up"})) for name, state in components.items()):
        return "degraded"
    return "ok"


def market_state(symbols: Mapping[str, Mapping[str, Any]]) -> str:
    """``ok`` (every symbol fresh), ``partial`` (some stale) or ``stale`` (all, or no symbol)."""
    stale = [s for s, m in symbols.items() if m.get("stale")]
    if not symbols or len(stale) == len(symbols):
        return "stale"
    return "partial" if stale else "ok"


def feed_state(feed: Mapping[str, Any] | None) -> str:
    """``ok``, ``stale`` (a symbol's MarketData actor delivered no candle for two candle intervals),
    ``degraded`` (a symbol's source is reconnecting, failing or unreachable) or ``unknown``."""
    if not isinstance(feed, Mapping) or not isinstance(feed.get("symbols"), Mapping):
        return "unknown"
    symbols = [st for st in feed["symbols"].values() if isinstance(st, Mapping)]
    if any(st.get("stale") for st in symbols):
        return "stale"
    return "degraded" if any(str(st.get("state")) in FEED_TROUBLE for st in symbols) else "ok"


def models_state(models: Mapping[str, Any]) -> str:
    """``up``, ``fallback`` (serving an older set because the current one failed to load) or ``down``."""
    if models.get("status") != "up":
        return "down"
    return "fallback" if models.get("fallback") else "up"


def log_state(database: Mapping[str, Any]) -> str:
    """The prediction log's own state (``database.log.status``: up, spooling, disk_full, ...)."""
    log = database.get("log")
    if not isinstance(log, Mapping):
        return "not_configured"
    return str(log.get("status", "unknown"))
