"""`vlserve bench --sweep` flags (declared in bench/flags.py) → SweepConfig; the sweep itself
is sweep.py."""

from __future__ import annotations

import math

from vlserve.bench.config import SweepConfig
from vlserve.bench.flags import BenchFlags


def sweep_from_flags(f: BenchFlags) -> SweepConfig | None:
    """None unless --sweep or --sweep-rates; a sweep sets the rate itself."""
    if not (f.sweep or f.sweep_rates):
        return None
    if f.rate_limit or not math.isinf(f.request_rate):
        raise ValueError("--sweep sets the request rate: drop --request-rate and --rate-limit")
    try:
        rates = tuple(float(r) for r in (f.sweep_rates or "").split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--sweep-rates expects R1,R2,..., got {f.sweep_rates!r}") from None
    return SweepConfig(
        rates=rates,
        start_rate=f.sweep_start,
        factor=f.sweep_factor,
        max_runs=f.sweep_max_runs,
        precision=f.sweep_precision,
        slo_attainment=f.slo_attainment,
    )
