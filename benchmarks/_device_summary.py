"""benchmarks/device_check.sh's results file, from what its steps left in WORK so far.

    python benchmarks/_device_summary.py WORK OUT DEVICE DRY SECONDS

Each step NAME left NAME.txt (its output) and NAME.rc ("exit_code seconds"); the served steps
left vlserve bench summaries; decode_step.py left JSON lines. A step not run yet is absent.
Exits 1 unless every step ran and passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = (
    "exactness-graphs", "exactness-eager", "decode-step", "sampling", "realsize", "served", "prefix"
)  # fmt: skip
KEEP = ("request_throughput", "output_token_throughput", "ttft_ms", "tpot_ms", "e2el_ms")
KEEP += ("completed", "failed", "duration_s")


def main() -> int:
    work, out, device, dry, seconds = Path(sys.argv[1]), sys.argv[2], *sys.argv[3:6]
    steps = {}
    for rc in sorted(work.glob("*.rc")):
        code, took = rc.read_text().split()
        text = (work / f"{rc.stem}.txt").read_text(errors="replace")
        steps[rc.stem] = {"exit_code": int(code), "seconds": int(took), "tail": text[-3000:]}
    bench = {}
    for f in sorted(work.glob("bench-*.summary.json")):
        summary = json.loads(f.read_text())
        bench[f.name.removesuffix(".summary.json")] = {
            k: v for k, v in summary.items() if k.startswith(KEEP)
        }
    decode = work / "decode-step.jsonl"
    lines = decode.read_text().splitlines() if decode.exists() else []
    result = {
        "device": device,
        "dry_run": dry == "1",
        "seconds": int(seconds),
        "env": (work / "env.txt").read_text().strip(),
        "steps": steps,
        "decode_step": [json.loads(line) for line in lines],
        "bench": bench,
    }
    Path(out).write_text(json.dumps(result, indent=1))
    missing = [s for s in STEPS if s not in steps]
    failed = [s for s, r in steps.items() if r["exit_code"] != 0]
    ok = not missing and not failed and bool(bench)
    print(f"results in {out} ({seconds} s): {'OK' if ok else 'FAILED'}"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; not run: {', '.join(missing)}" if missing else ""))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
