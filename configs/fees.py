"""Typed loader for ``configs/fees.yaml``: the fee profiles (venue, fee, slippage, borrow rate).

Settings selects one by name (``fee_profile``) and takes its ``fee_rate``, ``slippage_rate`` and
``borrow_rate`` from it unless those are set explicitly; ``features.costs.Costs.from_settings``
turns the result into the costs every consumer charges (and ``features.costs.profile_costs`` one
profile as the file defines it). This module imports nothing from ``features``: configs is the
bottom layer. A typo in the file or an unknown profile
name is a :class:`ConfigError` at start-up, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FEES_FILE = "fees.yaml"
SHIPPED = Path(__file__).resolve().parent / FEES_FILE


class FeeProfile(BaseModel):
    """One venue and order type: costs per fill and, for spot, the borrow rate of shorts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    venue: Literal["spot", "usdm_futures"]
    fee_bps: float = Field(ge=0, lt=500)  # per fill, basis points of the filled notional
    slippage_bps: float = Field(ge=0, lt=500)  # per fill, against the trade
    borrow_rate_annual: float | None = Field(None, ge=0, lt=10)  # spot shorts only; a fraction per year

    @model_validator(mode="after")
    def _borrow(self) -> "FeeProfile":
        if self.venue == "spot" and self.borrow_rate_annual is None:
            raise ValueError("a spot profile needs borrow_rate_annual (spot shorts borrow the base asset)")
        if self.venue != "spot" and self.borrow_rate_annual:
            raise ValueError("futures profiles borrow nothing: leave borrow_rate_annual out")
        return self


class FeeProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fee_profiles: dict[str, FeeProfile] = Field(min_length=1)


def fees_path(config_dir: str | Path | None) -> Path:
    """``<config_dir>/fees.yaml`` when it exists, else the shipped file (a config folder may hold
    only the YAML sections it changes)."""
    if config_dir is not None and (Path(config_dir) / FEES_FILE).exists():
        return Path(config_dir) / FEES_FILE
    return SHIPPED


def load_fee_profiles(config_dir: str | Path | None = None) -> dict[str, FeeProfile]:
    """Read and validate the fee profiles (``ValueError`` naming the key; Settings reports it as a ConfigError)."""
    path = fees_path(config_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        return FeeProfileFile.model_validate(raw or {}).fee_profiles
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path.name}: {problems}") from None


def resolve_costs(data: dict, config_dir: str | Path | None) -> dict:
    """Settings input ``data`` with ``fee_rate``, ``slippage_rate`` and ``borrow_rate`` filled from
    the selected profile where they are not set (explicit values win)."""
    profiles = load_fee_profiles(config_dir)
    name = data.get("fee_profile", "spot_taker")
    if name not in profiles:
        raise ValueError(f"fee_profile: {name!r} is not a profile of {FEES_FILE} ({', '.join(profiles)})")
    p = profiles[name]
    if p.venue != "spot" and data.get("borrow_rate") not in (None, 0, 0.0, "0", "0.0"):
        raise ValueError(f"borrow_rate: profile {name!r} is a futures venue, where shorts borrow nothing")
    filled = {"fee_rate": p.fee_bps / 1e4, "slippage_rate": p.slippage_bps / 1e4,
              "borrow_rate": p.borrow_rate_annual or 0.0}
    return {**data, **{k: v for k, v in filled.items() if data.get(k) is None}}
