"""examples/prompts_to_dpo.py (prompts -> samples -> pairwise ranking -> FastDPOTrainer with BCR) runs
end to end, at a small size: a noiseless judge builds only truly ordered pairs, within the bound."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import prompts_to_dpo  # noqa: E402


def test_prompts_to_dpo_runs_end_to_end(tmp_path):
    args = ["--prompts", "48", "--k", "6", "--judge-noise", "0", "--steps", "4", "--out", str(tmp_path)]
    result = prompts_to_dpo.main(args)
    assert result["pairs"] > 0
    assert result["pair_accuracy"] == 1.0  # a noiseless judge: every kept pair truly ordered
    assert (tmp_path / "pairs.jsonl").read_text().count("\n") == result["pairs"]
    assert "eval_rewards/accuracies" in result["reward_accuracy"]
