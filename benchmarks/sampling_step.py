"""The sampler's share of a decode step: ``sample()`` over (rows, 151,936) logits per filter mix.

Each mix samples every row the same way. The figure is ms per call (median of --repeats), and its
ratio to plain temperature sampling on the same rows:

  greedy              argmax only
  temperature         temperature 0.7, no filter (two-level inverse CDF over the vocabulary)
  qwen-defaults       Qwen3-VL's generation_config: temperature 0.7, top-k 20, top-p 0.8
                      (drawn over the 20 candidates; the default path of a real request)
  top-p-only          temperature 0.7, top-p 0.8, no top-k (sorts the whole vocabulary)
  qwen+logprobs       qwen-defaults with top_logprobs=20

Measured 2026-12-05 on 2 CPU cores, 32 rows: qwen-defaults 102.5 ms before the candidates path
(the whole-vocabulary sort), 6.2 ms after.

    python benchmarks/sampling_step.py [--device cpu] [--rows 16 32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlserve.engine.request import SamplingParams
from vlserve.engine.sampling import SamplerState, sample

VOCAB = 151_936  # Qwen3-VL's

MIXES = {
    "greedy": {"temperature": 0.0},
    "temperature": {"temperature": 0.7},
    "qwen-defaults": {"temperature": 0.7, "top_k": 20, "top_p": 0.8},
    "top-p-only": {"temperature": 0.7, "top_p": 0.8},
    "qwen+logprobs": {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "logprobs": 20},
}


def _ms(logits: torch.Tensor, params: SamplingParams, repeats: int) -> float:
    states = [SamplerState(params, (1, 2, 3), VOCAB, logits.device) for _ in range(len(logits))]
    sample(logits, states)  # warm-up
    times = []
    for _ in range(repeats):
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(logits, states)  # reads the tokens back: the step's one synchronisation
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    for rows in args.rows:
        logits = (torch.randn(rows, VOCAB, generator=generator) * 3).to(args.device)
        figures = {
            name: _ms(logits, SamplingParams(max_tokens=16, **kw), args.repeats)  # type: ignore[arg-type]
            for name, kw in MIXES.items()
        }
        base = figures["temperature"]
        for name, ms in figures.items():
            print(f"{rows:4d} rows  {name:14s} {ms:8.2f} ms  x{ms / base:6.2f} of temperature")


if __name__ == "__main__":
    main()
