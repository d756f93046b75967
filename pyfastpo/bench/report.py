"""Write a sweep's results: ``results.md`` (tables), ``results.json`` and PNG plots.

Plots (matplotlib, Agg backend): for each path, fwd+bwd time and peak memory
against sequence length (sizes sharing N, V, H and prompt fraction) and against
vocabulary size (sizes sharing N, T, H and prompt fraction), log-log; and against
the prompt fraction, one row of panels per size. A plot is made only where the
sweep varies that axis over at least two points.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from . import environment
from .measure import TOLERANCES
from .measure import __doc__ as MEASURE_DOC

MIB = 2**20


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def _check_cell(row: dict) -> str:
    if row["status"] != "ok":
        return "error"
    if row.get("oracle"):
        return "oracle"
    return "pass" if row["passed"] else "FAIL"


def table(rows: list[dict], path: str, has_copy: bool) -> list[str]:
    unit = "GB/s" if path == "logits" else "TFLOP/s"
    base = "TRL" if path == "logits" else "materialized"
    head = (
        [
            "contender",
            "size",
            "valid tok",
            "fwd ms",
            "bwd ms",
            "fwd+bwd ms",
            f"time / {base}",
            "peak MiB",
            f"mem / {base}",
            unit,
        ]
        + (["% of copy"] if has_copy and path == "logits" else [])
        + ["max abs Δlogps", "max abs Δgrad"]
        + (["max abs Δloss"] if path == "linear" else [])
        + ["check"]
    )
    head.insert(2, "prompt")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        first = [r["contender"], r["size"], _fmt(r.get("prompt_fraction"), "g"), str(r["valid_tokens"])]
        if r["status"] != "ok":
            cells = first + ["-"] * (len(head) - 6) + [r["error"].replace("|", "/"), "error"]
        else:
            cells = first + [
                _fmt(r["fwd_ms"]),
                _fmt(r["bwd_ms"]),
                _fmt(r["total_ms"]),
                _fmt(r["time_ratio"], ".2f", "x"),
                _fmt(r["peak_bytes"] / MIB, ".1f"),
                _fmt(r["mem_ratio"], ".3f", "x"),
                _fmt(r["throughput"], ".1f" if path == "logits" else ".3f"),
            ]
            if has_copy and path == "logits":
                cells.append(_fmt(r["copy_fraction"] and 100 * r["copy_fraction"], ".1f", "%"))
            cells += [_fmt(r["d_logps"], ".1e"), _fmt(r["d_grad"], ".1e")]
            if path == "linear":
                cells.append(_fmt(r.get("d_loss"), ".1e"))
            cells.append(_check_cell(r))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fractions(meta: dict, rows: list[dict]) -> str:
    fractions = meta.get("prompt_fractions") or sorted({r.get("prompt_fraction", 0.25) for r in rows})
    return ", ".join(f"{f:g}" for f in fractions)


def _tolerance_text(meta: dict) -> str:
    import torch

    dtype = getattr(torch, meta["dtype"], None)
    parts = []
    for path in meta.get("paths", ("logits", "linear")):
        tol = TOLERANCES.get((path, dtype))
        if tol:
            parts.append(f"{path} path {meta['dtype']}: logps tol {tol[0]:g}, gradient tol {tol[1]:g}")
    return "; ".join(parts) or "tolerances per dtype"


def markdown(meta: dict, rows: list[dict], skipped: list[dict], plots: list[str]) -> str:
    has_copy = meta.get("copy_bandwidth_gbs") is not None
    out = [
        "# pyfastpo benchmark",
        "",
        f"- device: {meta['device']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, pyfastpo {meta['pyfastpo']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- git commit: {meta['git_commit']}",
        f"- command: `{meta['command']}`",
        f"- dtype {meta['dtype']}; median of {meta['repeats']} runs after {meta['warmup']} warm-up runs "
        "(plus one first call for the correctness check)",
    ]
    if meta.get("device_type") == "cpu":
        out.append(f"- `cpp` backend's row kernels: {meta.get('cpp_isa', 'unknown')} instructions")
        out.append(
            f"- CPU load average (1 min) at the start: {meta['load_average']:.2f}; "
            f"OMP_WAIT_POLICY={meta['omp_wait_policy']} (on a CPU shared with other work, spinning "
            "OpenMP threads stall each other; `passive` keeps timings stable)"
        )
    if meta.get("gpu_kernels") is not None:
        out.append("- GPU kernels the run launched (registers, local memory; nonzero local memory means spills):")
        out += environment.kernel_lines(meta["gpu_kernels"]) or ["  - none of pyfastpo's"]
    if has_copy:
        out.append(
            f"- measured device copy bandwidth: {meta['copy_bandwidth_gbs']:.1f} GB/s "
            f"(`dst.copy_(src)` of {meta['copy_bytes'] / MIB:.0f} MiB, read + write)"
        )
    out += [
        "",
        "Sizes are N x T x V (x H on the linear path). The logits path is `logits [N,T,V] -> logps [N]` and its "
        "gradient for a fixed random dL/dlogps; the linear path is a reference-free sigmoid DPO loss (beta 0.1) "
        "from hidden states `[N,T,H]` and an lm_head `[V,H]`, with gradients for both. Labels look like DPO data: "
        f"the first `prompt` fraction of each row is prompt (fractions {_fractions(meta, rows)}), up to a quarter "
        "right padding (`valid tok` counts the rest). "
        "Ratios are this contender over the path's baseline at the same size and prompt fraction (lower is better). "
        "`check` compares logps, gradient and (linear path) loss with `reference` at the same size, prompt "
        "fraction and dtype (pass: max abs difference <= tol x max(1, max abs reference value), the loss held to "
        f"the logps tol; {_tolerance_text(meta)}; tolerances in `pyfastpo/bench/measure.py`).",
        "",
    ]
    for path in ("logits", "linear"):
        prow = [r for r in rows if r["path"] == path]
        if prow:
            title = "Logits path" if path == "logits" else "Linear path"
            out += [f"## {title}", ""] + table(prow, path, has_copy) + [""]
    if meta.get("sources"):
        out += ["## What each contender runs", ""]
        out += [f"- `{name}`: {src}" for name, src in meta["sources"].items()] + [""]
    out += ["## Skipped contenders", ""]
    if skipped:
        out += ["| path | contender | reason |", "|---|---|---|"]
        out += [f"| {s['path']} | {s['contender']} | {s['reason'].replace('|', '/')} |" for s in skipped]
    else:
        out.append("None.")
    notes = sorted({(r["contender"], r["note"]) for r in rows if r.get("note")})
    if notes:
        out += ["", "Notes: " + "; ".join(f"`{c}` {n}" for c, n in notes) + "."]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += ["", "## Method", "", "```", MEASURE_DOC.strip(), "```", ""]
    return "\n".join(out)


AXES = ("n", "t", "v", "h", "prompt_fraction")


def _axis_groups(rows: list[dict], axis: str) -> list[tuple[tuple, list[dict]]]:
    """Groups of ok rows that share every size dimension and prompt fraction but ``axis`` and
    span >= 2 values of it."""
    keys = [k for k in AXES if k != axis]
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[tuple(r[k] for k in keys)].append(r)
    return [(k, g) for k, g in groups.items() if len({r[axis] for r in g}) >= 2]


def plots(rows: list[dict], out_dir: Path, meta: dict) -> list[str]:
    """Write the PNGs; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for path in ("logits", "linear"):
        prow = [r for r in rows if r["path"] == path]
        for axis, label in (("t", "sequence length T"), ("v", "vocabulary size V")):
            groups = _axis_groups(prow, axis)
            if not groups:
                continue
            # the group with the most points (ties: the most rows, then a prompt fraction nearest 0.25)
            key, group = max(
                groups,
                key=lambda kg: (len({r[axis] for r in kg[1]}), len(kg[1]), -abs(kg[1][0]["prompt_fraction"] - 0.25)),
            )
            fixed = ", ".join(
                f"{k.upper()}={v}" if k != "prompt_fraction" else f"prompt {v:g}"
                for k, v in zip([k for k in AXES if k != axis], key)
                if not (path == "logits" and k == "h")
            )
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
            _draw(ax_t, ax_m, group, axis)
            for ax, what in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(label)
                ax.set_ylabel(what)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=8)
            fig.suptitle(f"{path} path, {meta['dtype']}, {fixed} - {meta['device']}", fontsize=9)
            fig.tight_layout()
            name = f"{path}_vs_{'seq_len' if axis == 't' else 'vocab'}.png"
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            written.append(name)
        name = _fraction_plot(plt, prow, path, out_dir, meta)
        if name:
            written.append(name)
    return written


def _draw(ax_t, ax_m, group: list[dict], axis: str) -> None:
    """One line per contender (in row order): fwd+bwd time on ``ax_t``, peak memory on ``ax_m``."""
    for name in sorted({r["contender"] for r in group}, key=[r["contender"] for r in group].index):
        pts = sorted((r[axis], r["total_ms"], max(r["peak_bytes"], 1) / MIB) for r in group if r["contender"] == name)
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax_m.plot(xs, [p[2] for p in pts], marker="o", label=name)


def _fraction_plot(plt, rows: list[dict], path: str, out_dir: Path, meta: dict) -> str | None:
    """``<path>_vs_prompt_fraction.png``: time and peak memory against the prompt fraction, a row
    of two panels per size (sizes in sweep order); None when no size has two fractions."""
    groups = _axis_groups(rows, "prompt_fraction")
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups)), squeeze=False)
    for (ax_t, ax_m), (_, group) in zip(axes, groups):
        _draw(ax_t, ax_m, group, "prompt_fraction")
        for ax, what in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_yscale("log")
            ax.set_xlabel("prompt fraction (of each row, ignored)")
            ax.set_ylabel(what)
            ax.set_title(f"{path} {group[0]['size']}", fontsize=9)
            ax.set_xticks(sorted({r["prompt_fraction"] for r in group}))
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{path} path against prompt fraction, {meta['dtype']} - {meta['device']}", fontsize=9)
    fig.tight_layout()
    name = f"{path}_vs_prompt_fraction.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def write(out_dir: Path, meta: dict, rows: list[dict], skipped: list[dict]) -> dict:
    """results.md, results.json and the plots under ``out_dir``; returns a summary.

    On a CUDA device ``meta`` gains ``gpu_kernels``: the kernels this process launched
    during the sweep, with their registers (read here, after the sweep)."""
    if meta.get("device_type") == "cuda" and "gpu_kernels" not in meta:
        meta["gpu_kernels"] = environment.kernel_resources(meta.get("dtype"))
    out_dir.mkdir(parents=True, exist_ok=True)
    names = plots(rows, out_dir, meta)
    (out_dir / "results.md").write_text(markdown(meta, rows, skipped, names))
    payload = {"meta": meta, "rows": rows, "skipped": skipped, "plots": names}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    counts = Counter(_check_cell(r) for r in rows)
    return {"plots": names, "checks": dict(counts)}
