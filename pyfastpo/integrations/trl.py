"""TRL integration: ``FastDPOConfig`` and ``FastDPOTrainer``, drop-in for ``trl.DPOConfig`` / ``trl.DPOTrainer``.

::

    from pyfastpo.integrations.trl import FastDPOConfig as DPOConfig, FastDPOTrainer as DPOTrainer

The trainer keeps everything of TRL's ``DPOTrainer`` (data processing, the
collator, the reference model or PEFT adapter toggling, precomputed reference
log-probs, logging) and replaces the loss: per-sequence log-probs come from
:func:`pyfastpo.sequence_logps` (one streaming pass over the logits, gradient
written back into their storage) and the loss from
:func:`pyfastpo.preference_loss`, which adds FocalPO, MallowsPO, SimPO and
budget-controlled regularization to TRL's loss types. With
``use_fused_linear=True`` the logits are never materialized:
:func:`pyfastpo.linear_preference_loss` takes the backbone's last hidden
states and the ``lm_head`` weight.

Written against trl 1.13 (``DPOTrainer._compute_loss``); with
``loss_type="sigmoid"`` and defaults it reproduces ``DPOTrainer`` step for step
(length-normalized types count predicted tokens, which differs from trl only
for an empty prompt: see docs/trl.md).
DPOConfig options the loss path does not implement raise ``ValueError`` at
construction; none is ignored.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import trl_version  # noqa: F401  (first: raises ImportError on an unsupported trl, before trl's internals)

# isort: split
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import hash_module, use_adapter

from ..backends import available_backends
from ..distributed import forward_replaced, lm_head_preference_loss
from ..distributed import gathered as gathered_module
from ..fused import fused_preference_loss
from ..linear import linear_preference_loss, linear_sequence_logps
from ..losses import check_loss_options, needs_reference_entropy
from ..pairs import REFERENCE_ENTROPIES, ld_token_weights
from ..sequence_logps import IGNORE_INDEX, sequence_logps
from .trl_config import FastDPOConfig, check_supported, loss_options

__all__ = ["FastDPOConfig", "FastDPOTrainer"]

# Batch keys that are not model inputs: TRL's plus the precomputed reference entropies.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *REFERENCE_ENTROPIES}
# Salt of the precomputed-reference cache fingerprint: our cache holds more columns than TRL's.
_CACHE_SALT = "pyfastpo-ref-stats-v1"


class _RefStatsCollator:
    """Wraps a preference collator so that batches also carry the precomputed reference entropies."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        for key in REFERENCE_ENTROPIES:
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return batch


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss runs on pyfastpo; same constructor, same logged metrics.

    Adds the loss types of :func:`pyfastpo.preference_loss` (``focalpo``,
    ``mallows_dpo``, ``mallows_ipo``, ``mallows_phi``, ``simpo``) and BCR, logs
    ``mallows/dispersion`` with a Mallows loss (and ``loss/bcr`` with BCR). The
    Mallows losses read the reference model's token entropies from the reference
    forward or, with ``precompute_ref_log_probs=True``, from the
    ``ref_chosen_entropy``/``ref_rejected_entropy`` columns stored next to TRL's
    ``ref_chosen_logps``/``ref_rejected_logps``.
    """

    _tag_names = ["trl", "dpo", "pyfastpo"]

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = FastDPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DPO")
        check_supported(args)
        self._pyfastpo_loss_kwargs = loss_options(args)
        if not isinstance(args, FastDPOConfig):  # a plain DPOConfig: check its loss options as FastDPOConfig does
            check_loss_options(**self._pyfastpo_loss_kwargs)
        self._pyfastpo_backend = getattr(args, "pyfastpo_backend", "auto")
        if self._pyfastpo_backend != "auto" and self._pyfastpo_backend not in available_backends(args.device):
            raise ValueError(
                f"pyfastpo_backend={self._pyfastpo_backend!r} cannot run on {args.device}; "
                f"available here: {available_backends(args.device)}"
            )
        self._pyfastpo_use_linear = bool(getattr(args, "use_fused_linear", False))
        # Reference-free with no Mallows loss: no reference model at all (a Mallows loss still
        # reads the reference's entropies; its log-probs are then ignored by the loss).
        self._pyfastpo_no_reference = bool(getattr(args, "reference_free", False)) and not needs_reference_entropy(
            args.loss_type
        )
        self._pyfastpo_needs_entropy = needs_reference_entropy(args.loss_type)
        if self._pyfastpo_use_linear:
            if compute_metrics is not None:
                raise ValueError(
                    "compute_metrics needs the logits, which use_fused_linear=True never materializes; "
                    "set use_fused_linear=False or drop compute_metrics"
                )

        if self._pyfastpo_no_reference and ref_model is not None:
            raise ValueError(
                "reference_free=True runs no reference model (no Mallows loss needs its entropies): drop ref_model"
            )
        if self._pyfastpo_no_reference:
            # trl's constructor would load a reference model from the policy's path; an empty module
            # stands in (never run), and is dropped below.
            ref_model = torch.nn.Module()
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self._pyfastpo_use_linear:
            self._check_fused_linear()
        if self._pyfastpo_no_reference:
            self.ref_model = None  # never run: its memory goes back now
        # The fused linear path calls the unwrapped backbones, so the models accelerate compiled
        # for torch_compile=True never run there: compile the policy's region (backbone, then the
        # fused loss) and the reference's backbone call here, with the same backend and mode (as
        # accelerate compiles both the policy and the reference model), so the option is not skipped.
        self._pyfastpo_policy_linear_loss, self._pyfastpo_run_backbone = self._policy_linear_loss, _run_backbone
        if self._pyfastpo_use_linear and args.torch_compile:
            compile_kwargs = dict(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
            self._pyfastpo_policy_linear_loss = torch.compile(self._policy_linear_loss, **compile_kwargs)
            self._pyfastpo_run_backbone = torch.compile(_run_backbone, **compile_kwargs)

    # ------------------------------------------------------------------ checks

    def _check_fused_linear(self) -> None:
        if self._is_vlm:
            raise ValueError("use_fused_linear=True supports causal language models only, not vision-language models")
        if self.aux_loss_enabled:
            raise ValueError(
                "use_fused_linear=True does not produce the MoE router logits needed by the load-balancing loss; "
                "set router_aux_loss_coef=0.0 or use_fused_linear=False"
            )
        if self.accelerator.num_processes > 1:
            self._check_fused_linear_wrapper()
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
            value = getattr(text_config, attr, neutral)
            if value is not None and value != neutral:
                raise ValueError(
                    f"use_fused_linear=True computes hidden @ lm_head.weight only, but this model's config sets "
                    f"{attr}={value}, which its logits apply; set use_fused_linear=False"
                )
        if is_peft_model(model):
            from peft import PromptLearningConfig
            from peft.tuners.tuners_utils import BaseTunerLayer

            if isinstance(model.get_output_embeddings(), BaseTunerLayer):
                raise ValueError(
                    "use_fused_linear=True reads lm_head.weight directly, so a PEFT adapter on lm_head would never "
                    "be trained; remove 'lm_head' from target_modules or set use_fused_linear=False"
                )
            if any(isinstance(cfg, PromptLearningConfig) for cfg in model.peft_config.values()):
                raise ValueError(
                    "use_fused_linear=True calls the backbone directly, which skips the virtual tokens of "
                    "prompt-learning PEFT methods; use LoRA or set use_fused_linear=False"
                )

    def _check_fused_linear_wrapper(self) -> None:
        """Multi-process fused linear runs inside the wrapped model's forward (DDP, FSDP2):
        refuse the wrappers that shard parameters in ways that path was not built for."""
        supported = "it supports DDP and FSDP2 (fsdp_version=2) multi-process training"
        if self.is_deepspeed_enabled:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            if stage == 3:
                raise ValueError(
                    "use_fused_linear=True does not support DeepSpeed ZeRO-3 (partitioned lm_head weight): "
                    f"{supported}; use FSDP2 or set use_fused_linear=False"
                )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                f"use_fused_linear=True does not support FSDP1 (flat parameters): {supported}; "
                "set fsdp_version=2 in the FSDP config or use_fused_linear=False"
            )

    # -------------------------------------------------- precomputed reference

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if not self._is_vision_dataset:
            for key in REFERENCE_ENTROPIES:
                if key not in self._signature_columns:
                    self._signature_columns.append(key)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs ``(chosen, rejected)`` of one padded batch (TRL's API)."""
        logps, _ = self._compute_ref_stats(model, inputs)
        return logps.chunk(2, dim=0)

    def _reference_forward(self, model, model_kwargs, backbone_only: bool = False):
        """Reference outputs, with no gradient: ``ref_model``, or the policy with its adapter off (PEFT).

        The model and adapter choice is a copy of trl 1.13's ``compute_ref_log_probs``
        (private logic, not a hook), kept here so that the logits path, the hidden-state
        path (``backbone_only``) and the precompute all pick the same reference."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    if backbone_only:
                        inner = _causal_lm(unwrapped)
                        hidden = self._pyfastpo_run_backbone(_backbone(inner), model_kwargs)
                        return hidden, inner.get_output_embeddings()
                    return model(**model_kwargs)
            ref = self.ref_model if self.ref_model is not None else model
            if backbone_only:
                inner = _causal_lm(self.accelerator.unwrap_model(ref))
                return self._pyfastpo_run_backbone(_backbone(inner), model_kwargs), inner.get_output_embeddings()
            return ref(**model_kwargs)

    def _compute_ref_stats(self, model, inputs):
        """``(logps [N], entropy [N])`` of the reference on one padded batch."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        ref_outputs = self._reference_forward(model, model_kwargs)
        labels = _next_token_labels(inputs["input_ids"], inputs["completion_mask"])
        weights = None if self.args.ld_alpha is None else ld_token_weights(labels, self.args.ld_alpha)
        with torch.no_grad():
            stats = sequence_logps(
                ref_outputs.logits, labels, return_entropy=True, backend=self._pyfastpo_backend, token_weights=weights
            )
        return stats.logps, stats.entropy

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's precompute, storing ``ref_chosen_entropy``/``ref_rejected_entropy`` next to the log-probs.

        A copy of trl 1.13's private ``DPOTrainer._precompute_ref_logps`` (it stores two
        columns and has no hook for more), changed in three places: the collator is
        wrapped to carry the entropies, the cache fingerprint is salted (the cache holds
        more columns than TRL's), and the entropy columns are written."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        if not isinstance(self.data_collator, _RefStatsCollator):
            self.data_collator = _RefStatsCollator(self.data_collator)
        model_hash = hash_module(self.ref_model or self.model)
        fingerprint = [Hasher.hash((dataset._fingerprint, model_hash, _CACHE_SALT))]
        broadcast_object_list(fingerprint, from_process=0)
        fingerprint = fingerprint[0]
        cache_file = dataset._get_cache_file_path(fingerprint)
        if os.path.exists(cache_file):
            return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model

        columns = {k: [] for k in ("ref_chosen_logps", "ref_rejected_logps", *REFERENCE_ENTROPIES)}
        for batch in tqdm(
            iterable=loader,
            desc=f"Computing reference log probs and entropies for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        ):
            logps, entropy = self._compute_ref_stats(model, batch)
            values = (*logps.chunk(2), *entropy.chunk(2))
            values = self.accelerator.gather_for_metrics(values)
            for key, value in zip(columns, values):
                columns[key].append(value.cpu())
        columns = {k: torch.cat(v) for k, v in columns.items()}

        if self.accelerator.is_main_process:
            dataset.map(
                lambda batch, indices: {k: v[indices] for k, v in columns.items()},
                with_indices=True,
                batched=True,
                remove_columns=dataset.column_names,
                new_fingerprint=fingerprint,
                cache_file_name=cache_file,
                desc=f"Caching reference log probs and entropies for {name} dataset",
            )
        self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    # -------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._pyfastpo_use_linear:
            return self._compute_loss_linear(model, inputs, return_outputs)
        return self._compute_loss(model, inputs, return_outputs)

    def _reference_inputs(self, inputs):
        """Precomputed reference log-probs (and entropies when a Mallows loss needs them), ``{}``
        when no reference model runs (reference-free, no Mallows loss), or None: streamed."""
        if self._pyfastpo_no_reference:
            return {}
        if not self.precompute_ref_logps:
            return None
        ref = {"ref_chosen_logps": inputs["ref_chosen_logps"], "ref_rejected_logps": inputs["ref_rejected_logps"]}
        if self._pyfastpo_needs_entropy:
            if "ref_chosen_entropy" not in inputs:
                raise ValueError(
                    "the Mallows losses need reference entropies, but the batch has precomputed ref_chosen_logps "
                    "without ref_chosen_entropy/ref_rejected_entropy (a dataset precomputed by trl's DPOTrainer?); "
                    "drop those columns so that FastDPOTrainer recomputes them"
                )
            ref["ref_chosen_entropy"] = inputs["ref_chosen_entropy"]
            ref["ref_rejected_entropy"] = inputs["ref_rejected_entropy"]
        return ref

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs)

        # Same alignment and masking as trl: logits[:, t] predict input_ids[:, t + 1]; non-completion tokens
        # ignored. The labels are shifted instead of the logits (the last position predicts nothing), so the
        # in-place backward writes the gradient into the model's logits with no slice to back-propagate.
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        logits = outputs.logits
        shift_mask = completion_mask[..., 1:]
        labels = _next_token_labels(input_ids, completion_mask)
        ref = self._reference_inputs(inputs)
        ref_outputs = None
        if ref is None:  # streamed: the reference's logits go through the same pass as the policy's
            ref_model_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            ref_outputs = self._reference_forward(model, ref_model_kwargs)
        out = fused_preference_loss(
            logits,
            labels,
            ref_logits=None if ref_outputs is None else ref_outputs.logits,
            **(ref or {}),
            backend=self._pyfastpo_backend,
            ld_alpha=self.args.ld_alpha,
            use_weighting=self.args.use_weighting,
            **self._pyfastpo_loss_kwargs,
        )
        del ref_outputs  # the reference logits: freed before the backward, as in trl
        policy = out.policy
        chosen_logps, rejected_logps = policy.logps.chunk(2, dim=0)  # batch is [chosen, rejected]
        loss = out.loss
        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # Metrics trl computes from the logits, here from pyfastpo's per-sequence stats (no extra pass) ...
        self._log_policy_stats(mode, inputs, policy)
        # ... except the token accuracy, which needs the argmax of the chosen half (one read of those logits).
        half = len(shift_mask) // 2
        with torch.no_grad():
            predictions = logits[:half, :-1].argmax(dim=-1)
        chosen_mask = shift_mask[:half].bool()
        gather = self.accelerator.gather_for_metrics
        correct = gather(((predictions == input_ids[:half, 1:]) & chosen_mask).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        self._log_rewards(mode, out, chosen_logps, rejected_logps)
        return (loss, outputs) if return_outputs else loss

    def _compute_loss_linear(self, model, inputs, return_outputs):
        if return_outputs:
            raise RuntimeError(
                "return_outputs=True is not supported with use_fused_linear=True: the logits are never materialized"
            )
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = _next_token_labels(inputs["input_ids"], inputs["completion_mask"])

        ref_kwargs = self._reference_inputs(inputs)  # precomputed, {}, or None: streamed from the reference model
        if self.accelerator.num_processes > 1:
            # Under accelerate's autocast (bf16/fp16): the swapped-in forward replaces the top
            # model's forward, which is where accelerate installs it.
            with self.accelerator.autocast():
                out = self._linear_loss_in_forward(model, model_kwargs, labels, ref_kwargs)
        else:
            model = self.accelerator.unwrap_model(model)
            if ref_kwargs is None:
                ref_out, ref_head = self._reference_forward(model, model_kwargs, backbone_only=True)
                ref_kwargs = dict(
                    ref_hidden=ref_out.last_hidden_state, ref_weight=ref_head.weight, ref_bias=ref_head.bias
                )
            out = self._pyfastpo_policy_linear_loss(_causal_lm(model), model_kwargs, labels, ref_kwargs)
        chosen_logps, rejected_logps = out.policy.logps.chunk(2)
        # Like trl's Liger path: no mean_token_accuracy (it needs the argmax of logits that never exist).
        self._log_policy_stats(mode, inputs, out.policy)
        self._log_rewards(mode, out, chosen_logps, rejected_logps)
        return out.loss

    def _policy_linear_loss(self, policy_model, model_kwargs, labels, ref_kwargs):
        """The policy's part of a fused-linear step: backbone, then :func:`linear_preference_loss`
        against the reference's inputs. The region ``torch_compile=True`` compiles."""
        hidden = _backbone(policy_model)(**model_kwargs).last_hidden_state
        lm_head = policy_model.get_output_embeddings()
        return linear_preference_loss(
            hidden,
            lm_head.weight,
            labels,
            bias=lm_head.bias,
            backend=self._pyfastpo_backend,
            ld_alpha=self.args.ld_alpha,
            use_weighting=self.args.use_weighting,
            **ref_kwargs,
            **self._pyfastpo_loss_kwargs,
        )

    def _linear_loss_in_forward(self, model, model_kwargs, labels, ref_kwargs):
        """The fused-linear step run inside the wrapped model's forward (multi-process): DDP
        prepares its gradient reduction, FSDP2 gathers the parameters its root holds (the
        lm_head's among them) and reduce-scatters their gradients, as for any forward. The
        lm_head is called through :func:`pyfastpo.distributed.lm_head_preference_loss` (a
        unit of its own is gathered by its hooks). A streamed reference runs the same way,
        inside its own model's forward, to per-sequence log-probs and entropies."""
        if ref_kwargs is None:
            ref_kwargs = self._reference_stats_in_forward(model, model_kwargs, labels)
        inner = _causal_lm(self.accelerator.unwrap_model(model))

        def forward(*_args, **_kwargs):  # the wrapper hands model_kwargs back: the closure's are used
            hidden = _backbone(inner)(**model_kwargs).last_hidden_state
            return lm_head_preference_loss(
                inner.get_output_embeddings(),
                hidden,
                labels,
                backend=self._pyfastpo_backend,
                ld_alpha=self.args.ld_alpha,
                use_weighting=self.args.use_weighting,
                **ref_kwargs,
                **self._pyfastpo_loss_kwargs,
            )

        with forward_replaced(inner, forward):
            return model(**model_kwargs)

    def _reference_stats_in_forward(self, model, model_kwargs, labels) -> dict:
        """The reference's per-sequence log-probs (and entropies for the Mallows losses) from
        its hidden states and lm_head, run inside its model's forward (``ref_model``, or the
        policy with its adapter off): what :func:`linear_preference_loss` computes from
        ``ref_hidden``, handed over as precomputed values."""
        weights = None if self.args.ld_alpha is None else ld_token_weights(labels, self.args.ld_alpha)
        unwrapped = self.accelerator.unwrap_model(model)
        peft_ref = self.ref_model is None and is_peft_model(unwrapped)
        top = model if self.ref_model is None else self.ref_model
        inner = _causal_lm(self.accelerator.unwrap_model(top))

        def forward(*_args, **_kwargs):
            hidden = _backbone(inner)(**model_kwargs).last_hidden_state
            head = inner.get_output_embeddings()
            with gathered_module(head):
                return linear_sequence_logps(
                    hidden,
                    head.weight,
                    labels,
                    bias=head.bias,
                    return_entropy=True,
                    backend=self._pyfastpo_backend,
                    token_weights=weights,
                )

        adapter = "ref" if peft_ref and "ref" in unwrapped.peft_config else None
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            use_adapter(unwrapped, adapter_name=adapter) if peft_ref else contextlib.nullcontext(),
            forward_replaced(inner, forward),
        ):
            stats = top(**model_kwargs)
        ref = dict(zip(("ref_chosen_logps", "ref_rejected_logps"), stats.logps.chunk(2)))
        if self._pyfastpo_needs_entropy:
            ref.update(zip(REFERENCE_ENTROPIES, stats.entropy.chunk(2)))
        return ref

    def _log_policy_stats(self, mode, inputs, policy):
        """entropy, num_tokens and logits/* exactly as trl logs them, from the policy's
        per-sequence :class:`pyfastpo.SequenceLogps` (trl 1.13's ``_compute_loss``
        computes them from the logits; this restates its metric code)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        mean_logits, num_tokens = policy.mean_logits, policy.num_tokens
        entropy_sum, total = gather(policy.entropy.sum()).sum(), gather(num_tokens.sum()).sum()
        metrics["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        for name, mean, count in zip(("chosen", "rejected"), mean_logits.chunk(2), num_tokens.chunk(2)):
            total_logits, total_tokens = gather((mean * count).sum()).sum().item(), gather(count.sum()).sum().item()
            metrics[f"logits/{name}"].append(total_logits / total_tokens if total_tokens > 0 else 0.0)

    def _log_rewards(self, mode, out, chosen_logps, rejected_logps):
        """rewards/* and logps/* exactly as trl logs them (trl 1.13's ``_compute_loss``
        metric code, restated), plus pyfastpo's extra metrics."""
        metrics = self._metrics[mode]
        chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
        gather = self.accelerator.gather
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        for key in ("mallows/dispersion", "loss/bcr", "loss/nll", "loss/sft"):
            if key in out.metrics:
                metrics[key].append(self.accelerator.gather_for_metrics(out.metrics[key]).mean().item())


def _next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """trl's alignment as ``[N, L]`` labels for the unshifted logits: ``labels[:, t] = input_ids[:, t + 1]``,
    non-completion tokens and the last position (which predicts nothing) set to ``ignore_index``."""
    labels = input_ids[..., 1:].masked_fill(completion_mask[..., 1:] == 0, ignore_index)
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)


def _run_backbone(backbone, model_kwargs):
    """``backbone(**model_kwargs)``: a function of its own so that ``torch_compile=True`` can compile it."""
    return backbone(**model_kwargs)


def _causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (the model itself otherwise)."""
    return model.base_model.model if is_peft_model(model) else model


def _backbone(model):
    """The decoder stack without ``lm_head`` (``model.model`` for Llama-style causal LMs)."""
    return model.base_model if getattr(model, "base_model", model) is not model else model.get_decoder()
