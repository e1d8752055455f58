"""`vlserve bench --sweep` flags → SweepConfig (argparse only; the sweep itself is sweep.py)."""

from __future__ import annotations

import argparse
import math

from vlserve.bench.config import SweepConfig


def add_sweep_flags(sweep: argparse._ArgumentGroup) -> None:
    sweep.add_argument(
        "--sweep",
        action="store_true",
        help="run the workload at a series of request rates: --sweep-rates, else a search",
    )
    sweep.add_argument(
        "--sweep-rates", default=None, metavar="R1,R2,...", help="these rates (implies --sweep)"
    )
    for flag, kind, default, text in (
        ("--sweep-start", float, 1.0, "search: the first rate (req/s)"),
        ("--sweep-factor", float, 2.0, "search: rate multiplier until a rate fails"),
        ("--sweep-max-runs", int, 12, "search: at most this many rates"),
        ("--sweep-precision", float, 0.1, "search: bisect until failing <= passing x (1+P)"),
        ("--slo-attainment", float, 0.9, "share of requests that must meet every --goodput SLO"),
    ):
        sweep.add_argument(flag, type=kind, default=default, help=text)


def sweep_from_args(args: argparse.Namespace) -> SweepConfig | None:
    """None unless --sweep or --sweep-rates; a sweep sets the rate itself."""
    if not (args.sweep or args.sweep_rates):
        return None
    if args.rate_limit or not math.isinf(args.request_rate):
        raise ValueError("--sweep sets the request rate: drop --request-rate and --rate-limit")
    try:
        rates = tuple(float(r) for r in (args.sweep_rates or "").split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--sweep-rates expects R1,R2,..., got {args.sweep_rates!r}") from None
    return SweepConfig(
        rates=rates,
        start_rate=args.sweep_start,
        factor=args.sweep_factor,
        max_runs=args.sweep_max_runs,
        precision=args.sweep_precision,
        slo_attainment=args.slo_attainment,
    )
