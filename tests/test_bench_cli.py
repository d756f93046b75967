"""The benchmark CLI end to end on the CPU: files, table rows, plots, correctness, skips."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from pyfastpo.bench import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = "2x16x512,2x32x512,2x32x1024"  # two sequence lengths at one V, two V at one T: all four plots


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --quick's sizes are cut further, one prompt fraction, and the torch.compile'd contenders
    # (TRL compiled, Liger, CCE: tens of seconds of compiling each) are left out so that this
    # stays fast; their skips are checked below, the peers run in test_peers_run_on_the_cpu.
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--sizes",
        SIZES,
        "--hidden",
        "32",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--prompt-fractions",
        "0.25",
        "--baselines",
        "trl,logsoftmax,materialized",
        "--no-progress",
        "--out",
        str(out),
    ]
    code = cli.main(argv)
    return code, out, json.loads((out / "results.json").read_text())


def test_files_exist(bench_run):
    code, out, data = bench_run
    assert code == 0
    for name in ["results.md", "results.json", *data["plots"]]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert set(data["plots"]) == {f"{p}_vs_{a}.png" for p in ("logits", "linear") for a in ("seq_len", "vocab")}


def test_plots_are_pngs(bench_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    _, out, data = bench_run
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_table_has_a_row_per_contender_and_size(bench_run):
    _, out, data = bench_run
    md = (out / "results.md").read_text()
    runnable = data["meta"]["sources"]
    expected = {
        "logits": ["pyfastpo[reference]", "pyfastpo[cpp]", "trl-way", "log_softmax+gather"],
        "linear": [
            "pyfastpo-linear[reference]",
            "pyfastpo-linear[cpp]",
            "pyfastpo-linear[cpp]+two-pass",
            "materialized",
        ],
    }
    for path, names in expected.items():
        for name in names:
            assert name in runnable, f"{name} did not run: {data['skipped']}"
            for size in SIZES.split(","):
                label = size if path == "logits" else f"{size}x32"
                assert f"| {name} | {label} | 0.25 |" in md, f"no row for {name} at {label}"
    assert len(data["rows"]) == 3 * sum(len(v) for v in expected.values())
    for header in ["device:", "torch ", "date:", "git commit:", "command: `python -m pyfastpo.bench --quick"]:
        assert header in md


def test_correctness_checks_pass(bench_run):
    _, _, data = bench_run
    for row in data["rows"]:
        assert row["status"] == "ok", row
        assert row["passed"], row
        assert row["total_ms"] > 0 and row["peak_bytes"] >= 0 and row["throughput"] > 0
        if not row["oracle"]:
            assert row["time_ratio"] is not None
    baseline = [r for r in data["rows"] if r["contender"] == "trl-way"]
    assert all(r["time_ratio"] == pytest.approx(1.0) for r in baseline)


def test_missing_and_unselected_contenders_are_skipped_with_a_reason(bench_run):
    _, out, data = bench_run
    skipped = {s["contender"]: s["reason"] for s in data["skipped"]}
    md = (out / "results.md").read_text()
    for name in ("liger", "cce", "trl-way+compile"):
        assert "not selected" in skipped[name]
        assert f"| {'logits' if name.startswith('trl') else 'linear'} | {name} | not selected" in md
    assert "--include-interpreted" in skipped["pyfastpo[triton]"]


@pytest.mark.parametrize(
    "sizes, expected",
    [
        (["8x256x32000"], ["8x256x32000x512"]),
        (["8x256x32000,4x128x128256x64"], ["8x256x32000x512", "4x128x128256x64"]),
        (["8x256x32000", "4x128x32000"], ["8x256x32000x512", "4x128x32000x512"]),  # space-separated
        (["8x256x32000,", "4x128x32000"], ["8x256x32000x512", "4x128x32000x512"]),  # "A, B" unquoted
        (["2x8x64 2x8x128"], ["2x8x64x512", "2x8x128x512"]),  # one quoted, space-separated argument
    ],
)
def test_sizes_are_parsed(sizes, expected):
    args = cli.parse_args(["--device", "cpu", "--hidden", "512", "--sizes", *sizes])
    assert [s.label("linear") for s in args.size_list] == expected


@pytest.mark.parametrize(
    "sizes, message",
    [
        (["8x256"], "'8x256' is not NxTxV or NxTxVxH"),
        (["8x256x32000x512x2"], "is not NxTxV or NxTxVxH"),
        (["8x256xV"], "is not NxTxV or NxTxVxH"),
        (["-8x256x32000"], "expected at least one argument"),  # argparse: an option, not a value
        (["0x1x2"], "'0x1x2': every dimension must be at least 1"),
        (["2x0x2"], "every dimension must be at least 1"),
        (["2x8x64x0"], "every dimension must be at least 1"),
        (["3x8x16"], "'3x8x16': N must be even"),
        (["4x8x16,3x8x16"], "'3x8x16': N must be even"),
        ([","], "--sizes: no size given"),
        ([], "expected at least one argument"),
    ],
)
def test_bad_sizes_are_rejected(capsys, sizes, message):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--device", "cpu", "--sizes", *sizes])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "pyfastpo-bench: error:" in err and message in err, err


def test_default_out_is_named_like_the_results():
    """Without --out a run writes to out/bench/<device>-<YYYY-MM-DD>, the naming of benchmarks/results/."""
    import datetime

    assert cli.default_out("cuda", datetime.date(2026, 11, 25)).as_posix() == "out/bench/cuda-2026-11-25"
    args = cli.parse_args(["--device", "cpu"])
    assert args.out == f"out/bench/cpu-{datetime.date.today().isoformat()}"
    assert cli.parse_args(["--device", "cpu", "--out", "x/y"]).out == "x/y"


def test_explicit_sizes_run_side_by_side(tmp_path):
    """``--sizes`` runs exactly the sizes given (space-separated here), each with pyfastpo's
    backends next to the plain float32 log_softmax + gather."""
    out = tmp_path / "bench"
    code = cli.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--sizes",
            "2x8x64",
            "4x8x128",
            "--path",
            "logits",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--baselines",
            "logsoftmax",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    data = json.loads((out / "results.json").read_text())
    assert code == 0
    assert data["meta"]["sizes"] == ["2x8x64x256", "4x8x128x256"]  # --quick's H, as the linear path labels them
    runs = {(r["contender"], r["size"]) for r in data["rows"]}
    for size in ("2x8x64", "4x8x128"):
        for name in ("pyfastpo[reference]", "pyfastpo[cpp]", "log_softmax+gather"):
            assert (name, size) in runs, f"no row for {name} at {size}"
    assert {r["size"] for r in data["rows"]} == {"2x8x64", "4x8x128"}
    assert all(r["status"] == "ok" and r["passed"] for r in data["rows"])
    assert f"row kernels: {data['meta']['cpp_isa']} instructions" in (out / "results.md").read_text()


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "pyfastpo.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--include-interpreted" in result.stdout


def test_trl_fallback_matches_log_softmax_gather():
    """Without trl installed, "trl-way" runs pyfastpo's restatement of selective_log_softmax."""
    import torch

    from pyfastpo.bench.contenders import _selective_log_softmax_fallback

    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(3, 7, 50, generator=g), torch.randint(0, 50, (3, 7), generator=g)
    expected = torch.log_softmax(x.double(), -1).gather(-1, idx[..., None]).squeeze(-1)
    torch.testing.assert_close(_selective_log_softmax_fallback(x, idx).double(), expected, atol=1e-5, rtol=0)
    got = _selective_log_softmax_fallback(x.bfloat16(), idx)
    assert got.dtype == torch.bfloat16 and (got.double() - expected).abs().max() < 0.1


def test_correctness_check_fails_a_wrong_contender():
    """A contender that drops one token (~10 nats) or perturbs the gradient fails; pyfastpo's
    backends are held to float32 logps tolerance even with 16-bit inputs."""
    from pyfastpo.bench import measure

    ref_logps = torch.full((4,), -2000.0)
    ref_grad = torch.rand(4, 8, 16)
    dropped = ref_logps.clone()
    dropped[1] += 10.0
    for dtype in (torch.float32, torch.bfloat16):
        assert measure.check("logits", dtype, ref_logps, ref_grad, ref_logps, ref_grad, float32_logps=True)["passed"]
        assert not measure.check("logits", dtype, dropped, ref_grad, ref_logps, ref_grad, float32_logps=True)["passed"]
        assert not measure.check("logits", dtype, ref_logps, ref_grad + 0.5, ref_logps, ref_grad)["passed"]


# --- prompt fractions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fractions, expected",
    [
        (None, [0.0, 0.25, 0.5]),  # the CPU default, with or without --quick
        (["0,0.25,0.5"], [0.0, 0.25, 0.5]),
        (["0.5", "0"], [0.5, 0.0]),  # space-separated, in the order given
        (["0,", "0.25"], [0.0, 0.25]),  # "A, B" unquoted
        (["0.9"], [0.9]),
    ],
)
def test_prompt_fractions_are_parsed(fractions, expected):
    argv = ["--device", "cpu"] + (["--prompt-fractions", *fractions] if fractions else [])
    assert cli.parse_args(argv).fraction_list == expected
    assert cli.parse_args([*argv, "--quick"]).fraction_list == expected


@pytest.mark.parametrize(
    "fractions, message",
    [
        (["1"], "'1' is not in [0, 1)"),
        (["0,1.5"], "'1.5' is not in [0, 1)"),
        (["-0.25"], "'-0.25' is not in [0, 1)"),  # argparse takes a negative number as a value
        (["0,-0.25"], "'-0.25' is not in [0, 1)"),
        (["nan"], "'nan' is not in [0, 1)"),
        (["half"], "'half' is not a number"),
        (["25%"], "'25%' is not a number"),
        (["0.25,0.25"], "'0.25' is given twice"),
        ([","], "--prompt-fractions: no fraction given"),
        ([], "expected at least one argument"),
    ],
)
def test_bad_prompt_fractions_are_rejected(capsys, fractions, message):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--device", "cpu", "--prompt-fractions", *fractions])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "pyfastpo-bench: error:" in err and message in err, err


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("seq_len", [1, 2, 5, 16, 64])
def test_labels_follow_the_prompt_fraction(fraction, seq_len):
    """The first floor(T * fraction) positions are prompt (ignored), every row keeps a
    completion token, and the default (a quarter) is the labels the earlier sweeps used."""
    from pyfastpo.bench.data import IGNORE, make_labels

    labels = make_labels(6, seq_len, 50, torch.Generator().manual_seed(3), fraction)
    prompt = min(int(seq_len * fraction), seq_len - 1)
    assert (labels[:, :prompt] == IGNORE).all()
    assert ((labels != IGNORE).sum(-1) >= 1).all()
    assert ((labels[:, prompt:] != IGNORE).sum(-1) >= seq_len - prompt - seq_len // 4).all()  # padding <= T/4
    # the quarter-prompt labels of every earlier sweep, unchanged
    g = torch.Generator().manual_seed(3)
    old = torch.randint(0, 50, (6, seq_len), generator=g)
    old[:, : seq_len // 4] = IGNORE
    for row in range(6):
        old[row, seq_len - int(torch.randint(0, seq_len // 4 + 1, (1,), generator=g)) :] = IGNORE
    assert torch.equal(make_labels(6, seq_len, 50, torch.Generator().manual_seed(3)), old)


# --- the fused-linear peers on the CPU ---------------------------------------------------------

PEERS = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
PEER_FRACTIONS = (0.0, 0.25, 0.5)


def test_peers_are_registered_on_the_linear_path():
    from pyfastpo.bench import contenders

    registered = {c.name: c for c in contenders.registry()}
    for name in PEERS:
        c = registered[name]
        assert c.path == "linear" and c.group == name and name in contenders.BASELINE_GROUPS
        assert not c.oracle and not c.baseline
        assert c.skip_on_failure  # a broken torch.compile skips it with the error, it never ends the sweep
    assert contenders.CCE_IMPL == {"cuda": "cce", "cpu": "torch_compile"}


@pytest.fixture(scope="module")
def peers_run(tmp_path_factory):
    """Liger and CCE beside pyfastpo at a tiny size on the CPU, at three prompt fractions."""
    out = tmp_path_factory.mktemp("peers")
    argv = [
        "--device",
        "cpu",
        "--path",
        "linear",
        "--sizes",
        "2x16x256",
        "--hidden",
        "16",
        "--prompt-fractions",
        ",".join(map(str, PEER_FRACTIONS)),
        "--backends",
        "cpp",
        "--baselines",
        "liger,cce",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    code = cli.main(argv)
    return code, out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(PEERS))
def test_peers_run_on_the_cpu(peers_run, name):
    """Each peer runs on the CPU when installed, at every prompt fraction, and agrees with
    ``reference`` (logps, both gradients and the loss) within the float32 linear-path tolerance;
    when it is not installed it is listed as skipped with the pip name to install."""
    code, out, data = peers_run
    module, pip_name = PEERS[name]
    skipped = {s["contender"]: s["reason"] for s in data["skipped"]}
    if importlib.util.find_spec(module) is None:
        assert f"{pip_name} is not installed" in skipped[name]
        pytest.skip(f"{pip_name} is not installed: {skipped[name]}")
    assert name not in skipped, skipped.get(name)
    assert code == 0
    rows = [r for r in data["rows"] if r["contender"] == name]
    assert sorted(r["prompt_fraction"] for r in rows) == list(PEER_FRACTIONS)
    for r in rows:
        assert r["status"] == "ok" and r["passed"], r
        assert r["d_loss"] <= r["allow_loss"] and r["d_logps"] <= r["allow_logps"] and r["d_grad"] <= r["allow_grad"]
        assert r["total_ms"] > 0 and r["peak_bytes"] >= 0 and r["time_ratio"] is None  # no materialized run
    md = (out / "results.md").read_text()
    for f in PEER_FRACTIONS:
        assert f"| {name} | 2x16x256x16 | {f:g} |" in md
    if name == "cce":
        assert "impl='torch_compile'" in data["meta"]["sources"]["cce"]
    assert "linear_vs_prompt_fraction.png" in data["plots"]


def test_compile_runs_pyfastpo_compiled_next_to_eager(tmp_path):
    """``--compile`` adds each selected backend under torch.compile on both paths (``--wpo``:
    with WPO's statistic on the logits path), checked
    against the oracle like every contender, with its own time and peak memory; without
    the flag those rows are skipped with the reason."""
    out = tmp_path / "bench"
    argv = ["--device", "cpu", "--quick", "--sizes", "2x8x64x16", "--backends", "cpp", "--repeats", "1"]
    argv += ["--warmup", "0", "--prompt-fractions", "0.25", "--baselines", "none", "--no-progress"]
    assert cli.main([*argv, "--compile", "--wpo", "--out", str(out)]) == 0
    rows = {r["contender"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for name in ("pyfastpo[cpp]+compile", "pyfastpo-linear[cpp]+compile", "pyfastpo[cpp]+wpo"):
        assert rows[name]["status"] == "ok" and rows[name]["passed"], rows[name]
        assert rows[name]["peak_bytes"] > 0 and rows[name]["total_ms"] > 0
    assert "torch.compile(pyfastpo" in (out / "results.md").read_text()
    assert cli.main([*argv, "--out", str(tmp_path / "eager")]) == 0
    skipped = {
        s["contender"]: s["reason"] for s in json.loads((tmp_path / "eager" / "results.json").read_text())["skipped"]
    }
    assert skipped["pyfastpo[cpp]+compile"] == "not selected (pass --compile)"
    assert skipped["pyfastpo[cpp]+wpo"] == "not selected (pass --wpo)"


def test_memory_budget_sets_pyfastpos_linear_chunk(tmp_path, capsys):
    """--memory-budget-mib reaches pyfastpo's linear contenders (named in their source) and
    decides their mode; a non-positive budget is refused before anything runs."""
    argv = ["--device", "cpu", "--quick", "--path", "linear", "--sizes", "2x8x64x16", "--backends", "cpp"]
    argv += ["--baselines", "none", "--repeats", "1", "--warmup", "0", "--no-progress"]
    assert cli.main([*argv, "--memory-budget-mib", "3", "--out", str(tmp_path)]) == 0
    sources = json.loads((tmp_path / "results.json").read_text())["meta"]["sources"]
    assert f"memory_budget_bytes={3 << 20}" in sources["pyfastpo-linear[cpp]"]
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--device", "cpu", "--memory-budget-mib", "0"])
    assert exc.value.code == 2 and "--memory-budget-mib: a positive number of MiB" in capsys.readouterr().err
