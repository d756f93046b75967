"""``python -m pyfastpo.preference_data`` end to end: a tiny policy samples, a tiny causal LM
judges (both saved locally), pairs written; resume after a simulated crash; input errors
before any model loads."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402

from pyfastpo.preference_data import cli, judges  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tiny_setup  # noqa: E402

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()

PROMPTS = [
    "give me a red cat :",
    "show a blue dog :",
    "i want a green hat please :",
    "give me a gold cup :",
    "show a pink car :",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_setup.make_tokenizer(num_nouns=20)
    for name, seed in (("policy", 0), ("judge", 1)):
        model = tiny_setup.make_model(tokenizer, hidden_size=32, num_layers=1, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def argv(models, data, out, *extra):
    return [
        data,
        "--out",
        str(out),
        "--policy",
        str(models / "policy"),
        "--judge-lm",
        str(models / "judge"),
        "--judge-template",
        "{prompt} {first} or {second} :",
        "--judge-labels",
        "red,blue",
        "--k",
        "4",
        "--max-new-tokens",
        "3",
        "--batch-prompts",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def ranked(out) -> list[dict]:
    return [json.loads(line) for line in (out / "ranked.jsonl").read_text().splitlines()]


def test_cli_end_to_end_and_resume_after_a_crash(models, tmp_path, monkeypatch):
    """One presentation order: the random tiny judge names the same slot in both orders (all ties)."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    fresh = tmp_path / "fresh"
    assert cli.main(argv(models, data, fresh, "--pairs", "adjacent", "--one-order")) == 0
    lines = ranked(fresh)
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    for line in lines:
        assert len(line["completions"]) == 4 and sorted(line["order"]) == [0, 1, 2, 3]
        assert len(line["probabilities"]) <= 5 and line["queries"] == len(line["probabilities"])
    pairs = datasets.load_from_disk(str(fresh / "pairs"))
    assert 0 < len(pairs) <= 15 and {"prompt", "chosen", "rejected", "margin", "confidence"} <= set(pairs.column_names)
    assert len((fresh / "pairs.jsonl").read_text().splitlines()) == len(pairs)

    # A judge that raises on its 7th call: the first batch (2 prompts, <= 5 calls) is saved, the second is not.
    crashed = tmp_path / "crashed"
    original = judges.CausalLMJudge.compare
    calls = []

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(judges.CausalLMJudge, "compare", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(argv(models, data, crashed, "--pairs", "adjacent", "--one-order"))
    monkeypatch.setattr(judges.CausalLMJudge, "compare", original)
    saved = ranked(crashed)
    assert [line["index"] for line in saved] == [0, 1]
    assert not (crashed / "pairs").exists()
    with open(crashed / "ranked.jsonl", "a") as f:  # and a line torn mid-write
        f.write('{"index": 2, "prompt": "i want')

    assert cli.main(argv(models, data, crashed, "--pairs", "adjacent", "--one-order")) == 0
    resumed = ranked(crashed)
    assert resumed[:2] == saved  # finished prompts kept as they were, none redone
    assert resumed == lines  # the same as the uninterrupted run
    assert datasets.load_from_disk(str(crashed / "pairs"))[:] == pairs[:]

    # Everything ranked: a rerun builds other pairs without loading a model.
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("loaded a model"))
    assert cli.main(argv(models, data, crashed, "--pairs", "best_worst", "--one-order")) == 0
    assert len(datasets.load_from_disk(str(crashed / "pairs"))) <= 5


def test_cli_reads_given_completions_from_a_saved_dataset(models, tmp_path):
    rows = {"prompt": PROMPTS[:3], "completions": [["here is a red cat", "cat", "a blue cat"]] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = argv(models, str(tmp_path / "data"), out, "--judge-missing", "--keep-ties")
    args.remove("--policy")
    args.remove(str(models / "policy"))
    assert cli.main(args) == 0
    lines = ranked(out)
    assert [line["completions"] for line in lines] == rows["completions"]
    pairs = datasets.load_from_disk(str(out / "pairs"))
    assert len(pairs) == 3 and all(c is not None for c in pairs["confidence"])


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"text": "x"}], [], "'prompt'"),
        ([{"prompt": "x", "completions": ["only one"]}], [], "at least 2"),
        ([{"prompt": "x", "completions": "ab"}], [], "list of strings"),
        ([{"prompt": "x"}], ["--k", "1"], "--k 1"),
        ([{"prompt": "x"}], ["--no-policy"], "--policy"),
        ([{"prompt": "x"}], ["--no-judge"], "exactly one judge"),
        ([{"prompt": "x"}], ["--judge-labels", "A"], "two comma-separated"),
        ([{"prompt": "x"}], ["--judge-template", "{prompt} {first}"], "lacks {second}"),
        ([], [], "no records"),
    ],
)
def test_cli_input_errors_before_any_model_loads(models, tmp_path, monkeypatch, capsys, rows, extra, message):
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("loaded a model"))
    args = argv(models, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", *extra)
    for flag, drop in (("--no-policy", "--policy"), ("--no-judge", "--judge-lm")):
        if flag in args:
            at = args.index(drop)
            del args[at : at + 2]
            args.remove(flag)
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_both_judges_is_an_argument_error(models, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv(models, data, tmp_path / "out", "--judge-reward", str(models / "judge")))
    assert exit_info.value.code == 2
