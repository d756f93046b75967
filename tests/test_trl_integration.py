"""FastDPOTrainer against trl's DPOTrainer on a tiny Llama (CPU, float32, no downloads)."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import datasets  # noqa: E402
import transformers  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from pyfastpo.integrations.trl import FastDPOConfig, FastDPOTrainer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tiny_setup  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

# Every metric trl 1.13's DPOTrainer logs on this (dense, non-MoE) model.
TRL_METRICS = [
    "loss",
    "grad_norm",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]
RTOL = 1e-4
ATOL = 1e-6  # rewards are differences of ~ -30 log-probs: float32 rounding alone is ~1e-7 absolute there
# Parity runs use a moderate learning rate: step-1 gradients agree to float32 rounding (~1e-6 of their max), but
# AdamW divides each component by its own RMS, which turns that rounding into relative update differences on the
# small-gradient components; at lr 1e-3 two float32 implementations drift to ~4e-4 in grad_norm after 8 steps
# (pyfastpo's float64-exact reference backend included), at 3e-4 they stay below 2e-5.
PARITY = dict(learning_rate=3e-4, max_steps=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add synchronization (and spin-waiting on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_setup.make_tokenizer()


@pytest.fixture(scope="module")
def sft_model(tokenizer):
    return tiny_setup.make_sft_model(tokenizer, pairs=256, steps=30)


@pytest.fixture(scope="module")
def data():
    return tiny_setup.make_preference_dataset(32)


@pytest.fixture
def model_dir(sft_model, tmp_path):
    """The SFT model saved to disk, so that the trainers build their own reference from the path (trl's default)."""
    sft_model.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def config(cls, tmp_path, **overrides):
    kwargs = tiny_setup.dpo_config_kwargs(output_dir=str(tmp_path / "out"), learning_rate=5e-3, max_steps=6)
    kwargs.update(overrides)
    return cls(**kwargs)


def train(trainer_cls, model, tokenizer, dataset, args, **kwargs):
    torch.manual_seed(0)  # the same LoRA initialization for every trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


def assert_same_run(want, got, keys=TRL_METRICS):
    """Same metrics at every step (rel 1e-4, abs 1e-6 floor) and the same final parameters (rel 1e-4)."""
    logs_want, logs_got = step_logs(want), step_logs(got)
    assert len(logs_want) == len(logs_got) > 0
    for step, (a, b) in enumerate(zip(logs_want, logs_got), 1):
        for key in keys:
            assert key in b, f"{key} not logged"
            assert abs(a[key] - b[key]) <= RTOL * abs(a[key]) + ATOL, (step, key, a[key], b[key])
    for (name, p), q in zip(want.model.named_parameters(), got.model.parameters()):
        scale = p.detach().abs().max().item()
        assert (p.detach() - q.detach()).abs().max().item() <= RTOL * scale, name


def test_sigmoid_reproduces_dpo_trainer_step_for_step(tokenizer, data, model_dir, tmp_path):
    # Model given as a path: both trainers load the policy and build the reference the same (trl) way.
    want = train(DPOTrainer, model_dir, tokenizer, data, config(DPOConfig, tmp_path, **PARITY))
    got = train(FastDPOTrainer, model_dir, tokenizer, data, config(FastDPOConfig, tmp_path, **PARITY))
    assert_same_run(want, got)
    assert step_logs(got)[-1]["loss"] < math.log(2)  # it trained


def test_precomputed_reference_matches_dpo_trainer(tokenizer, sft_model, data, tmp_path):
    args = dict(PARITY, precompute_ref_log_probs=True, max_steps=4)
    want = train(DPOTrainer, copy.deepcopy(sft_model), tokenizer, data, config(DPOConfig, tmp_path, **args))
    got = train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, config(FastDPOConfig, tmp_path, **args))
    assert_same_run(want, got)
    for column in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy"):
        assert column in got.train_dataset.column_names
    torch.testing.assert_close(
        torch.tensor(got.train_dataset["ref_chosen_logps"]), torch.tensor(want.train_dataset["ref_chosen_logps"])
    )
    entropy = torch.tensor(got.train_dataset["ref_chosen_entropy"])
    assert bool((entropy > 0).all())


def test_mallows_with_precomputed_entropies_matches_live_reference(tokenizer, sft_model, data, tmp_path):
    args = dict(PARITY, loss_type="mallows_dpo", max_steps=3)
    live = train(
        FastDPOTrainer,
        copy.deepcopy(sft_model),
        tokenizer,
        data,
        config(FastDPOConfig, tmp_path, **args),
        ref_model=copy.deepcopy(sft_model),
    )
    pre = train(
        FastDPOTrainer,
        copy.deepcopy(sft_model),
        tokenizer,
        data,
        config(FastDPOConfig, tmp_path, precompute_ref_log_probs=True, **args),
    )
    assert_same_run(live, pre, keys=TRL_METRICS + ["mallows/dispersion"])
    phi = step_logs(pre)[0]["mallows/dispersion"]
    assert 0 < phi < 1


def test_peft_matches_dpo_trainer(tokenizer, sft_model, data, tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )

    args = dict(max_steps=4, learning_rate=3e-3)  # LoRA: few, small parameters
    want = train(
        DPOTrainer, copy.deepcopy(sft_model), tokenizer, data, config(DPOConfig, tmp_path, **args), peft_config=lora()
    )
    got = train(
        FastDPOTrainer,
        copy.deepcopy(sft_model),
        tokenizer,
        data,
        config(FastDPOConfig, tmp_path, **args),
        peft_config=lora(),
    )
    assert got.ref_model is None  # the reference is the base model, adapter disabled
    assert_same_run(want, got)
    assert step_logs(got)[-1]["rewards/margins"] != 0


@pytest.mark.parametrize("loss_type", ["focalpo", "mallows_dpo", "mallows_ipo", "mallows_phi", "simpo"])
def test_new_loss_types_train(loss_type, tokenizer, sft_model, data, tmp_path):
    args = config(FastDPOConfig, tmp_path, loss_type=loss_type, max_steps=24, per_device_eval_batch_size=32)
    trainer = FastDPOTrainer(
        model=copy.deepcopy(sft_model),
        ref_model=copy.deepcopy(sft_model),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logs = step_logs(trainer)
    assert all(math.isfinite(h[key]) for h in logs for key in TRL_METRICS)
    assert ("mallows/dispersion" in logs[0]) == loss_type.startswith("mallows")
    assert before["eval_rewards/accuracies"] == 0  # policy == reference: every reward is 0
    assert after["eval_rewards/accuracies"] >= 0.65, after
    assert after["eval_rewards/margins"] > 0


def test_multiple_loss_types_with_weights_and_bcr(tokenizer, sft_model, data, tmp_path):
    args = config(
        FastDPOConfig,
        tmp_path,
        loss_type=["sigmoid", "mallows_dpo"],
        loss_weights=[0.5, 1.0],
        bcr_weight=0.1,
        bcr_budget=0.0,
        max_steps=3,
    )
    trainer = train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=copy.deepcopy(sft_model))
    first = step_logs(trainer)[0]
    # Step 1: policy == reference, so each loss is log 2 and BCR is 0.
    assert first["loss"] == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert first["loss/bcr"] == 0
    assert 0 < first["mallows/dispersion"] < 1


def test_plain_dpo_config_is_accepted(tokenizer, sft_model, data, tmp_path):
    trainer = train(
        FastDPOTrainer,
        copy.deepcopy(sft_model),
        tokenizer,
        data,
        config(DPOConfig, tmp_path, max_steps=1),
        ref_model=copy.deepcopy(sft_model),
    )
    assert step_logs(trainer)[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)


UNSUPPORTED = {
    "use_liger_kernel": dict(use_liger_kernel=True),
    "f_divergence_type": dict(f_divergence_type="forward_kl", loss_type="nca_pair"),  # trl refuses it too
    "reference_free": dict(reference_free=True, precompute_ref_log_probs=True),
    "reference_free:with ref_model": dict(reference_free=True),  # the test passes a ref_model
    "ld_alpha:range": dict(ld_alpha=1.5),
    "use_weighting:with aot": dict(use_weighting=True, loss_type="aot"),
    "pyfastpo_backend": dict(pyfastpo_backend="cuda" if not torch.cuda.is_available() else "nope"),
}


@pytest.mark.parametrize("option", sorted(UNSUPPORTED))
def test_unsupported_option_raises(option, tokenizer, sft_model, data, tmp_path):
    with pytest.raises(ValueError, match=option.split(":")[0]):
        args = config(FastDPOConfig, tmp_path, **UNSUPPORTED[option])
        FastDPOTrainer(
            model=copy.deepcopy(sft_model),
            ref_model=copy.deepcopy(sft_model),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "attr, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 2.0)]
)
def test_fused_linear_refuses_models_with_transformed_logits(attr, value, tokenizer, sft_model, data, tmp_path):
    """The linear path computes hidden @ lm_head.weight only: a model whose logits are
    soft-capped or scaled would silently get a different loss."""
    model = copy.deepcopy(sft_model)
    setattr(model.config, attr, value)
    with pytest.raises(ValueError, match=attr):
        FastDPOTrainer(
            model=model,
            ref_model=copy.deepcopy(sft_model),
            args=config(FastDPOConfig, tmp_path, use_fused_linear=True),
            train_dataset=data,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(loss_type="nope"), "loss_type"),
        (dict(loss_type=["sigmoid", "bogus"]), "loss_type"),
        (dict(beta=-1.0), "beta"),
        (dict(loss_type="robust", label_smoothing=0.7), "label_smoothing"),
        (dict(pyfastpo_backend="gpu"), "backend"),
        # Values that would flip the training signal.
        (dict(beta=float("inf")), "beta"),
        (dict(bcr_weight=-0.5), "bcr_weight"),
        (dict(loss_type="mallows_dpo", dispersion_scale=-0.29), "dispersion_scale"),
        (dict(loss_type="focalpo", focal_gamma=-1.0), "focal_gamma"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, -1.0]), "loss_weights"),
        # Options the chosen loss type never reads, set to a non-default value.
        (dict(loss_type="sigmoid", label_smoothing=0.1), "label_smoothing.*no effect"),
        (dict(loss_type="sigmoid", focal_gamma=0.3), "focal_gamma.*no effect"),
        (dict(loss_type="mallows_dpo", discopop_tau=0.2), "discopop_tau.*no effect"),
        (dict(bcr_budget=2.0), "bcr_weight"),
    ],
)
def test_bad_config_raises(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(FastDPOConfig, tmp_path, **overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_backend_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="backend='cuda' is not available.*To get it"):
        config(FastDPOConfig, tmp_path, pyfastpo_backend="cuda")


def test_trl_version_is_checked():
    from pyfastpo.integrations.trl_version import SUPPORTED_TRL, check_trl_version

    check_trl_version(SUPPORTED_TRL[0] + ".0")
    for version in ("1.12.2", SUPPORTED_TRL[1] + ".0", "2.0.0"):
        with pytest.raises(ImportError, match=f"supports trl >= {SUPPORTED_TRL[0]}"):
            check_trl_version(version)


def test_label_smoothing_with_mallows_dpo_is_used(tmp_path):
    """The MallowsPO authors' trainer applies cDPO smoothing to mallows_dpo: accepted, not ignored."""
    assert config(FastDPOConfig, tmp_path, loss_type="mallows_dpo", label_smoothing=0.1).label_smoothing == 0.1


def test_new_loss_types_are_accepted_by_the_config(tmp_path):
    args = config(FastDPOConfig, tmp_path, loss_type=["focalpo", "mallows_phi", "simpo"], loss_weights=[1, 1, 1])
    assert args.loss_type == ["focalpo", "mallows_phi", "simpo"]
    assert config(FastDPOConfig, tmp_path, loss_type="mallows_ipo").loss_type == ["mallows_ipo"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "mallows_dpo"])
@pytest.mark.parametrize("precompute", [False, True])
def test_fused_linear_matches_logits_path(loss_type, precompute, tokenizer, sft_model, data, tmp_path):
    runs = []
    for fused in (False, True):
        args = config(
            FastDPOConfig,
            tmp_path,
            **dict(PARITY, max_steps=3),
            loss_type=loss_type,
            use_fused_linear=fused,
            precompute_ref_log_probs=precompute,
        )
        ref = None if precompute else copy.deepcopy(sft_model)
        runs.append(train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=ref))
    keys = [k for k in TRL_METRICS if k not in ("entropy", "mean_token_accuracy")]  # not computed without logits
    assert_same_run(*runs, keys=keys)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_compiles_the_fused_linear_path(backend, tokenizer, sft_model, data, tmp_path, monkeypatch):
    """torch_compile=True with use_fused_linear=True: the policy's backbone and the fused loss
    run compiled (the loss is traced by dynamo, not skipped with the unwrapped model) and the
    run equals eager's."""
    from pyfastpo.integrations import trl as fast_trl

    traced = []

    def spy(real):
        def call(*args, **kwargs):
            traced.append(torch.compiler.is_compiling())  # True only while dynamo traces this call
            return real(*args, **kwargs)

        return call

    # The policy's fused loss and the reference's backbone (streamed, not precomputed).
    monkeypatch.setattr(fast_trl, "linear_preference_loss", spy(fast_trl.linear_preference_loss))
    monkeypatch.setattr(fast_trl, "_run_backbone", spy(fast_trl._run_backbone))
    runs = []
    for compiled in (False, True):
        traced.clear()
        extra = dict(torch_compile=True, torch_compile_backend=backend) if compiled else {}
        args = config(FastDPOConfig, tmp_path, **dict(PARITY, max_steps=3), use_fused_linear=True, **extra)
        runs.append(
            train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=copy.deepcopy(sft_model))
        )
        assert len(traced) >= 2 and all(t == compiled for t in traced), (compiled, traced)
    keys = [k for k in TRL_METRICS if k not in ("entropy", "mean_token_accuracy")]
    assert_same_run(*runs, keys=keys)


TRL_OPTIONS = {
    "f_js": dict(f_divergence_type="js_divergence"),
    "f_alpha": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "ld_dpo": dict(ld_alpha=0.5),
    "ld_dpo_precomputed": dict(ld_alpha=0.2, precompute_ref_log_probs=True),
    "ld_dpo_ipo": dict(ld_alpha=0.5, loss_type="ipo"),
    # trl's sft stays a plain cross-entropy under ld_alpha; WPO's weights read the plain log-probs.
    "ld_dpo_sft": dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
    "ld_dpo_wpo": dict(ld_alpha=0.5, use_weighting=True),
    "wpo": dict(use_weighting=True),
    # (trl 1.13's own use_weighting fails with "hinge": its in-place `*=` on relu's output.)
    # trl 1.13 warns and falls back to padding; FastDPOTrainer does the same.
    "padding_free": dict(padding_free=True),
    "wpo_ipo_robust": dict(
        use_weighting=True, loss_type=["ipo", "robust"], loss_weights=[0.5, 1.0], label_smoothing=0.1
    ),
}


@pytest.fixture(scope="module")
def uneven_data(data):
    """The pairs with completions of unequal lengths (a few words added to one side or the
    other), so that LD-DPO's tail weighting has tokens to act on."""
    extra = [" indeed", " truly so", ""]

    def lengthen(example, i):
        key = "chosen" if i % 2 else "rejected"
        return {key: example[key] + extra[i % 3]}

    return data.map(lengthen, with_indices=True)


@pytest.mark.parametrize("name", sorted(TRL_OPTIONS))
def test_trl_option_matches_dpo_trainer(name, tokenizer, sft_model, uneven_data, tmp_path):
    """f-DPO, LD-DPO and WPO as trl 1.13 computes them, step for step."""
    data = uneven_data
    runs = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (FastDPOTrainer, FastDPOConfig)):
        args = config(cfg, tmp_path, **dict(PARITY, max_steps=4), **TRL_OPTIONS[name])
        runs.append(train(cls, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=copy.deepcopy(sft_model)))
    assert_same_run(*runs)


def test_padding_free_warns_and_falls_back_as_trl_does(tokenizer, sft_model, data, tmp_path, caplog):
    """trl 1.13 logs a warning for padding_free=True and pads; FastDPOTrainer too (the
    numbers: TRL_OPTIONS["padding_free"])."""
    for cls, cfg in ((DPOTrainer, DPOConfig), (FastDPOTrainer, FastDPOConfig)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl.trainer.dpo_trainer"):
            trainer = cls(
                model=copy.deepcopy(sft_model),
                ref_model=copy.deepcopy(sft_model),
                args=config(cfg, tmp_path, padding_free=True),
                train_dataset=data,
                processing_class=tokenizer,
            )
        assert trainer.padding_free is False, cls.__name__
        assert any("padding_free=True" in r.getMessage() for r in caplog.records), cls.__name__


def test_reference_free_runs_no_reference(tokenizer, sft_model, data, tmp_path):
    """reference_free=True: no reference model is loaded or kept, and the rewards are beta
    times the policy's own log-probs (the reference's taken as 0)."""
    args = config(FastDPOConfig, tmp_path, **dict(PARITY, max_steps=3), reference_free=True)
    trainer = train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args)
    assert trainer.ref_model is None
    for log in step_logs(trainer):
        for side in ("chosen", "rejected"):
            want = args.beta * log[f"logps/{side}"]
            assert abs(log[f"rewards/{side}"] - want) <= 1e-6 * abs(want), (side, log)


def test_nll_weight_adds_the_chosen_nll(tokenizer, sft_model, data, tmp_path):
    runs = []
    for weight in (0.0, 0.5):
        args = config(FastDPOConfig, tmp_path, **dict(PARITY, max_steps=1), nll_weight=weight)
        runs.append(
            step_logs(
                train(
                    FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=copy.deepcopy(sft_model)
                )
            )[0]
        )
    plain, with_nll = runs
    assert "loss/nll" not in plain and with_nll["loss/nll"] > 0
    assert abs(with_nll["loss"] - plain["loss"] - with_nll["loss/nll"]) <= 1e-5 * with_nll["loss"]


# preference_loss parameters a config cannot hold, and why: per-pair tensors the trainer
# computes from each batch, and a shorthand whose two long forms are config fields.
NOT_CONFIG = {
    "chosen_num_tokens": "computed from the completion mask",
    "rejected_num_tokens": "computed from the completion mask",
    "ref_chosen_entropy": "computed in the reference's pass (or precomputed)",
    "ref_rejected_entropy": "computed in the reference's pass (or precomputed)",
    "vocab_size": "read from the logits",
    "dispersion": "a per-pair tensor; the trainer derives it from the reference entropies",
    "gamma": "a shorthand for focal_gamma / simpo_gamma, which are config fields",
    "pair_weights": "a per-pair tensor; use_weighting=True computes WPO's",
    "chosen_nll_logps": "computed in the policy's pass (the plain log-probs under ld_alpha)",
}


def test_every_preference_loss_option_is_reachable_from_the_config(tmp_path):
    import inspect

    from pyfastpo.integrations.trl_config import loss_options

    params = inspect.signature(pyfastpo_preference_loss()).parameters
    options = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    reachable = set(loss_options(config(FastDPOConfig, tmp_path)))
    unreachable = [n for n in options if n not in reachable and n not in NOT_CONFIG]
    assert not unreachable, f"preference_loss options no FastDPOConfig field reaches: {unreachable}"
    assert set(NOT_CONFIG) <= set(options)  # the exemptions name real parameters
    fields = FastDPOConfig.__dataclass_fields__
    for name in reachable - {"loss_type", "loss_weights"}:
        assert fields[name].metadata.get("help"), f"FastDPOConfig.{name} has no help string"


def pyfastpo_preference_loss():
    from pyfastpo import preference_loss

    return preference_loss


def test_mallows_paper_preset_trains(tokenizer, sft_model, data, tmp_path):
    """FastDPOConfig.mallows_paper(): the MallowsPO authors' settings. The reference model
    stays (its entropies set the dispersion) while its log-probs are left out: at step 1,
    where the policy equals the reference, the rewards are not 0 (they would be exactly 0
    with the reference subtracted)."""
    kwargs = tiny_setup.dpo_config_kwargs(output_dir=str(tmp_path / "out"), learning_rate=3e-4, max_steps=2)
    kwargs.pop("beta", None)
    args = FastDPOConfig.mallows_paper(**kwargs)
    assert (args.loss_type, args.beta, args.dispersion_scale) == (["mallows_dpo"], 10.0, 0.29)
    assert args.length_normalize and args.reference_free and args.mixing_alpha is None
    trainer = train(FastDPOTrainer, copy.deepcopy(sft_model), tokenizer, data, args, ref_model=copy.deepcopy(sft_model))
    assert trainer.ref_model is not None
    logs = step_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) and 0 < log["mallows/dispersion"] <= 1 for log in logs)
    assert logs[0]["rewards/chosen"] != 0  # no reference subtracted: policy = reference at step 1
