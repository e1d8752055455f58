"""The previous engine, for benchmarks that compare against it in the same run: a git worktree."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE_REV = "0e0908c"  # the last commit of the engine before v2 (padded, re-concatenated cache)


def worktree_src(rev: str = BASELINE_REV) -> Path:
    """``src/`` of a detached worktree of ``rev`` (created once, under the temp folder); put it
    first on PYTHONPATH to import that revision's vlserve."""
    tree = Path(tempfile.gettempdir()) / f"vlserve-{rev}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
    return tree / "src"
