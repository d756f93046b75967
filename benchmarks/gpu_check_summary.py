"""The last thing benchmarks/gpu_check.sh prints: one short table from what its steps wrote
under ``OUT`` (steps.tsv: name, exit status, seconds; each step's log and results).

    python benchmarks/gpu_check_summary.py OUT
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _last_match(path: Path, pattern: str) -> str:
    if not path.exists():
        return "no log"
    found = re.findall(pattern, path.read_text(errors="replace"), flags=re.MULTILINE)
    return found[-1].strip() if found else "-"


def _first_table(path: Path) -> list:
    """The rows of the first markdown table in ``path`` (header included, separator left out)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("|") and "---" not in line:
            rows.append(line)
        elif rows and not line.startswith("|"):
            break
    return rows


def summary(out: Path) -> str:
    """The summary table of one gpu_check.sh run."""
    lines = ["| step | status | seconds | result |", "|---|---|---|---|"]
    results = {
        "tests": lambda: _last_match(out / "tests.log", r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$"),
        "memcheck": lambda: _last_match(out / "memcheck.log", r"(ERROR SUMMARY: .*|no CUDA device.*|skipped.*)"),
        "triton": lambda: _last_match(out / "triton.log", r"^(fastest: .*)$"),
    }
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, rc, seconds = line.split("\t")
        status = "ok" if rc == "0" else "skipped" if rc == "skip" else "TIMEOUT" if rc == "124" else f"FAILED ({rc})"
        result = results.get(name, lambda: "")()
        lines.append(f"| {name} | {status} | {seconds} | {result} |")
    for name in ("logits", "linear"):
        rows = _first_table(out / name / "results.md")
        if rows:
            lines += ["", f"{name} (from {out / name / 'results.md'}):", *rows[:12]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu")))
