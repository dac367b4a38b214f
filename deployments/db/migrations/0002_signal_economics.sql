-- 0002: what a backend needs in a logged signal (issue 15): the trade's economics after costs.
-- expected_r: expected net R of the proposed trade after the costs of fee_profile (units of the stop
-- distance); cost_r: the round trip's fees and slippage in the same units; p_win: calibrated
-- P(net R > 0); fee_profile: the configs/fees.yaml profile (its costs also set pnl_percent/r_multiple).
-- Null in rows logged before this migration.
ALTER TABLE ml.signal_logs
    ADD COLUMN expected_r  double precision,
    ADD COLUMN cost_r      double precision,
    ADD COLUMN p_win       double precision,
    ADD COLUMN fee_profile text;
