"""`vlserve make-tiny-model DIR [--scripted]`: write a tiny Qwen3-VL checkpoint.

Random weights by default; ``--scripted`` writes the checkpoint whose answer to every prompt is
``DEFAULT_SCRIPT_TEXT`` then EOS (``scripted_model.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlserve.testing.tiny_model import DTYPES, build_tiny_model, count_parameters


@dataclass(frozen=True)
class TinyModelConfig:
    """Options of one ``make-tiny-model`` run."""

    out_dir: Path
    tied: bool = False
    seed: int = 0
    dtype: str | None = None  # None: bfloat16, or float32 with ``scripted``
    force: bool = False
    scripted: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.scripted and self.tied:
            raise ValueError("--scripted builds its own untied head; drop --tied")

    @property
    def stored_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if self.scripted else "bfloat16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="DIR", type=Path, help="folder to write into")
    parser.add_argument(
        "--tied",
        action="store_true",
        help="tie input and output embeddings (greedy output then mostly repeats the prompt); "
        "by default they are untied and greedy decoding emits visible text",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="stored dtype (default: bfloat16, or float32 with --scripted)",
    )
    parser.add_argument(
        "--scripted",
        action="store_true",
        help="write the scripted checkpoint instead: its greedy answer to any chat prompt is "
        "a fixed text with a tool call, then <|im_end|> (verified before it is written)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into DIR even if it is not empty (our files are overwritten, others kept)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = TinyModelConfig(
            out_dir=args.out_dir,
            tied=args.tied,
            seed=args.seed,
            dtype=args.dtype,
            force=args.force,
            scripted=args.scripted,
        )
    except ValueError as exc:
        print(f"vlserve make-tiny-model: {exc}", file=sys.stderr)
        return 2
    return make_tiny_model(config)


def make_tiny_model(config: TinyModelConfig) -> int:
    """Build the checkpoint and report where it went; 1 if DIR is in the way."""
    out = config.out_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not config.force)):
        print(
            f"vlserve make-tiny-model: {out} exists and is not an empty folder "
            "(pass --force to write into it)",
            file=sys.stderr,
        )
        return 1
    dtype = config.stored_dtype
    start = time.perf_counter()
    if config.scripted:
        from vlserve.testing.scripted_model import DEFAULT_SCRIPT_TEXT, build_scripted_model

        path = build_scripted_model(out, seed=config.seed, dtype=dtype)
        kind = f"scripted: answers {DEFAULT_SCRIPT_TEXT!r} then <|im_end|>, verified"
    else:
        path = build_tiny_model(out, tied=config.tied, seed=config.seed, dtype=dtype)
        kind = "tied" if config.tied else "untied"
    elapsed_s = time.perf_counter() - start
    num_params = count_parameters(path)
    print(
        f"wrote tiny Qwen3-VL ({kind}, {dtype}, seed {config.seed}) to {path.resolve()}: "
        f"{num_params:,} parameters in {elapsed_s:.1f} s"
    )
    return 0
