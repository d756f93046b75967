"""The benchmark CLI without its optional packages, and the file citations of the results.

- Without the ``bench`` extra (tqdm, matplotlib), ``pyfastpo-bench`` says in one line
  which extra to install and exits non-zero, before any sweep (no traceback).
- benchmarks/results/**/*.md cite only files that exist in the repo; README.md and
  docs/*.md link only to files that exist.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyfastpo.bench import cli

REPO = Path(__file__).resolve().parents[1]
ARGV = [
    "--device",
    "cpu",
    "--quick",
    "--sizes",
    "2x8x64",
    "--hidden",
    "8",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--baselines",
    "none",
    "--no-progress",
]
INSTALL = f"pip install 'pyfastpo[{cli.BENCH_EXTRA}]'"


# --- the bench extra ---------------------------------------------------------------------------


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_named_extra_provides_every_module_the_cli_checks():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert cli.BENCH_EXTRA in extras
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extras[cli.BENCH_EXTRA]}
    for module in cli.EXTRA_MODULES:
        assert module in names, f"{module} is checked by the CLI but not in the {cli.BENCH_EXTRA!r} extra"


def test_bench_modules_import_nothing_optional_at_module_level():
    """Only the stdlib, torch, numpy and pyfastpo at import time: optional packages are imported lazily."""
    base = set(sys.stdlib_module_names) | {"torch", "numpy", "pyfastpo", "__future__"}
    for path in sorted((REPO / "pyfastpo" / "bench").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in base, f"{path.name}:{node.lineno} imports {top} at module level"


@pytest.mark.parametrize("missing", [("tqdm",), ("matplotlib",), ("tqdm", "matplotlib")])
def test_missing_extra_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path, missing):
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "bench"
    code = cli.main([*ARGV, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert INSTALL in err
    for module in missing:
        assert module in err
    assert not out.exists(), "the sweep ran although it could not have finished"


def test_missing_extra_from_the_command_line(tmp_path):
    """``python -m pyfastpo.bench`` exits non-zero with the message, no traceback."""
    out = tmp_path / "bench"
    script = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None; "
        f"sys.argv = ['pyfastpo-bench', *{[*ARGV, '--out', str(out)]!r}]; "
        "runpy.run_module('pyfastpo.bench', run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert INSTALL in result.stderr and "tqdm" in result.stderr and "matplotlib" in result.stderr
    assert not out.exists()


def test_help_needs_no_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "--include-interpreted" in capsys.readouterr().out


# --- file citations in the results -------------------------------------------------------------

EXTS = "py|md|json|png|svg|csv|txt|sh|toml|cfg|yaml|yml|cpp|cu|h|ipynb"
TOP_DIRS = ("benchmarks", "tests", "pyfastpo", "csrc", "kernels", "docs", "examples", "scripts", ".ci")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)")  # [text](target) and ![alt](target)
CODE = re.compile(r"`([^`\n]+)`")
BARE_FILE = re.compile(rf"(?<![\w/.:-])((?:[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:{EXTS}))(?![\w/])")
BARE_DIR = re.compile(rf"(?<![\w/.:-])((?:{'|'.join(map(re.escape, TOP_DIRS))})/[\w./*-]*)")
PATHLIKE = re.compile(rf"^(?:[\w.*-]+/)+[\w.*-]*$|^[\w.*-]+\.(?:{EXTS})$")


def cited_paths(text: str) -> set[str]:
    """Repo-relative paths cited by a markdown text: link targets, path-like words in
    backticks, and bare words that name a file (by extension) or a top-level repo folder."""
    found = {m.group(1) for m in LINK.finditer(text)}
    for m in CODE.finditer(text):
        found |= {w for w in m.group(1).split() if PATHLIKE.match(w)}
    found |= {m.group(1) for m in BARE_FILE.finditer(text)} | {m.group(1) for m in BARE_DIR.finditer(text)}
    cleaned = set()
    for p in found:
        p = p.split("#")[0].rstrip(".,;:")
        if p and "://" not in p and not p.startswith(("mailto:", "#")):
            cleaned.add(p)
    return cleaned


def missing_citations(md: Path, paths: set[str]) -> list[str]:
    """The paths that name nothing, relative to the markdown file's folder or the repo root."""

    def exists(p: str) -> bool:
        for base in (md.parent, REPO):
            if "*" in p:
                if any(base.glob(p)):
                    return True
            elif (base / p).exists():
                return True
        return False

    return sorted(p for p in paths if not exists(p))


RESULTS = sorted((REPO / "benchmarks" / "results").rglob("*.md"))


def test_there_are_results_to_check():
    assert RESULTS, "benchmarks/results holds no markdown"


@pytest.mark.parametrize("md", RESULTS, ids=lambda p: str(p.relative_to(REPO)))
def test_results_cite_only_existing_files(md):
    missing = missing_citations(md, cited_paths(md.read_text()))
    assert not missing, f"{md.relative_to(REPO)} cites files that do not exist: {missing}"


@pytest.mark.parametrize(
    "md", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(REPO))
)
def test_readme_and_docs_link_only_to_existing_files(md):
    links = {p.split("#")[0] for p in (m.group(1) for m in LINK.finditer(md.read_text())) if "://" not in p}
    missing = missing_citations(md, {p for p in links if p})
    assert not missing, f"{md.relative_to(REPO)} links to files that do not exist: {missing}"


def test_the_citation_check_can_fail(tmp_path):
    md = tmp_path / "results.md"
    md.write_text(
        "- command: `python benchmarks/no_such_bench.py --out benchmarks/results/x`\n"
        "see [the plot](no_such_plot.png) and ![p](benchmarks/results/cpu-2026-11-25/logits_vs_vocab.png)\n"
        "the floor (DESIGN.md's model); tolerances in `pyfastpo/bench/measure.py`; 34 GB/s; dL/dlogps;\n"
        "https://example.com/a/b.py\n"
    )
    assert missing_citations(md, cited_paths(md.read_text())) == [
        "DESIGN.md",
        "benchmarks/no_such_bench.py",
        "benchmarks/results/x",
        "no_such_plot.png",
    ]
