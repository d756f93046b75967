"""``FastDPOConfig``: ``trl.DPOConfig`` plus pyfastpo's options (kept apart from the
trainer, as TRL keeps ``dpo_config.py``), and what the trainer reads from a config."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import trl_version  # noqa: F401  (first: raises ImportError on an unsupported trl, before trl's internals)

# isort: split
from trl import DPOConfig

from ..backends import check_backend_available
from ..losses import LOSS_TYPES, check_loss_options, needs_reference_entropy
from ..pairs import check_ld_alpha, check_use_weighting

__all__ = ["FastDPOConfig", "check_supported", "loss_options"]


@dataclass
class FastDPOConfig(DPOConfig):
    r"""``trl.DPOConfig`` plus pyfastpo's options.

    ``loss_type`` accepts every TRL value plus ``focalpo``, ``mallows_dpo``,
    ``mallows_ipo``, ``mallows_phi`` and ``simpo``, alone or as a list weighted
    by ``loss_weights``.

    Parameters:
        focal_gamma (`float`, defaults to `0.05`): FocalPO's exponent.
        focal_detach (`bool`, defaults to `False`): stop the gradient through FocalPO's factor.
        dispersion_scale (`float`, defaults to `0.29`): MallowsPO's ``c`` (``phi = Hbar ** c``).
        simpo_gamma (`float`, defaults to `0.5`): SimPO's target margin.
        bcr_weight (`float`, defaults to `0`): weight of budget-controlled regularization (0: off).
        bcr_budget (`float`, defaults to `0`): how far the chosen log-likelihood may fall for free.
        bcr_per_token (`bool`, defaults to `False`): measure the drop per completion token.
        nll_weight (`float`, defaults to `0`): weight of the chosen completion's per-token NLL added
            to every pair's loss (RPO; trl 1.13 has no such option, its nearest is a loss list with
            ``"sft"``).
        reference_free (`bool`, defaults to `False`): the reference log-probs are taken as 0. The
            reference model is neither run nor kept, except with a Mallows loss, where its
            entropies still set the dispersion (the MallowsPO authors' default).
        length_normalize (`bool`, defaults to `False`): divide every log-prob by its completion's
            length before the loss (the MallowsPO authors' ``length_normalization``).
        home_advantage (`float`, defaults to `0`): a margin subtracted inside DPO's logit.
        mixing_alpha (`float` or `None`, defaults to `None`): the MallowsPO authors' mixing of the
            reference ratio and the home advantage in the logit.
        sft_weight (`float`, defaults to `0`): adds ``sft_weight`` times the chosen completion's NLL
            (summed; per token under ``length_normalize``).
        pyfastpo_backend (`str`, defaults to `"auto"`): ``auto``, ``reference``, ``triton``, ``cuda`` or ``cpp``.
        use_fused_linear (`bool`, defaults to `False`): compute the loss from the backbone's hidden
            states and the ``lm_head`` weight (``pyfastpo.linear_preference_loss``) without
            materializing logits.
    """

    focal_gamma: float = field(default=0.05, metadata={"help": "FocalPO exponent gamma (loss_type='focalpo')."})
    focal_detach: bool = field(
        default=False, metadata={"help": "Stop the gradient through FocalPO's modulating factor sigmoid(h)^gamma."}
    )
    dispersion_scale: float = field(
        default=0.29, metadata={"help": "MallowsPO dispersion scale c: phi = Hbar ** c (mallows_* loss types)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin (loss_type='simpo')."})
    bcr_weight: float = field(
        default=0.0, metadata={"help": "Budget-controlled regularization weight (0 disables it)."}
    )
    bcr_budget: float = field(
        default=0.0, metadata={"help": "BCR budget: how far the chosen log-likelihood may fall without penalty."}
    )
    bcr_per_token: bool = field(
        default=False, metadata={"help": "BCR: divide the chosen log-likelihood drop by the completion length."}
    )
    nll_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the chosen completion's per-token NLL added to each pair's loss (RPO; 0: off)."},
    )
    reference_free: bool = field(
        default=False,
        metadata={
            "help": "Reference-free training: the reference log-probs are taken as 0. No reference model is run "
            "or kept, except with a Mallows loss, whose dispersion comes from the reference's entropies."
        },
    )
    length_normalize: bool = field(
        default=False,
        metadata={"help": "Divide every log-prob by its completion length before the loss (MallowsPO authors)."},
    )
    home_advantage: float = field(
        default=0.0, metadata={"help": "Margin subtracted from the log-ratio difference in DPO's logit."}
    )
    mixing_alpha: float | None = field(
        default=None,
        metadata={
            "help": "MallowsPO authors' mixing: logit = beta ((chosen - rejected) - alpha (ref_chosen - ref_rejected) "
            "- (1 - alpha) home_advantage); None: off."
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the chosen completion's NLL (summed, per token under length_normalize) added."},
    )
    pyfastpo_backend: str = field(
        default="auto",
        metadata={"help": "pyfastpo backend: 'auto', 'reference', 'triton', 'cuda' or 'cpp'."},
    )
    use_fused_linear: bool = field(
        default=False,
        metadata={
            "help": "Compute the loss from the last hidden states and the lm_head weight "
            "(pyfastpo.linear_preference_loss), never materializing the logits."
        },
    )

    @classmethod
    def mallows_paper(cls, output_dir: str | None = None, **overrides) -> FastDPOConfig:
        """The MallowsPO authors' released training configuration (their ``DPOConfig``
        defaults, github.com/haoxian-chen/MallowsPO): ``mallows_dpo``, ``beta=10``,
        dispersion scale ``c=0.29`` (their ``neg_log_dispersion_mean``), length
        normalization, reference-free logits (the reference model only sets the
        dispersion), no home advantage, mixing or SFT term. ``overrides`` replace any field."""
        settings = dict(
            loss_type="mallows_dpo", beta=10.0, dispersion_scale=0.29, length_normalize=True, reference_free=True
        )
        return cls(output_dir=output_dir, **{**settings, **overrides})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {unknown} is unknown; choose from {sorted(LOSS_TYPES)}")
        try:  # unknown, or not installed here: say how to get it now, not at step 1
            check_backend_available(self.pyfastpo_backend)
        except ValueError as err:
            raise ValueError(f"pyfastpo_backend: {err}") from None
        super().__post_init__()
        options = loss_options(self)
        check_loss_options(**options)
        check_ld_alpha(self.ld_alpha)
        check_use_weighting(self.use_weighting, options["loss_type"], options)


def loss_options(args) -> dict:
    """``preference_loss`` keyword arguments from a (Fast)DPOConfig; plain DPOConfigs get
    pyfastpo's defaults for the options they lack."""
    defaults = FastDPOConfig.__dataclass_fields__
    get = lambda name: getattr(args, name, defaults[name].default)  # noqa: E731
    return dict(
        loss_type=list(args.loss_type),
        loss_weights=args.loss_weights,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        discopop_tau=args.discopop_tau,
        focal_gamma=get("focal_gamma"),
        focal_detach=get("focal_detach"),
        simpo_gamma=get("simpo_gamma"),
        dispersion_scale=get("dispersion_scale"),
        bcr_weight=get("bcr_weight"),
        bcr_budget=get("bcr_budget"),
        bcr_per_token=get("bcr_per_token"),
        nll_weight=get("nll_weight"),
        sft_weight=get("sft_weight"),
        length_normalize=get("length_normalize"),
        reference_free=get("reference_free"),
        home_advantage=get("home_advantage"),
        mixing_alpha=get("mixing_alpha"),
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
    )


def check_supported(args) -> None:
    """Raise ValueError for every DPOConfig option this trainer does not implement."""
    problems = []
    if args.use_liger_kernel:
        problems.append(
            "use_liger_kernel=True: FastDPOTrainer replaces the Liger DPO loss; its fused counterpart is "
            "use_fused_linear=True (set use_liger_kernel=False)"
        )
    if getattr(args, "reference_free", False) and not needs_reference_entropy(args.loss_type):
        conflicts = [name for name in ("precompute_ref_log_probs", "sync_ref_model") if getattr(args, name)]
        if conflicts:
            problems.append(
                f"reference_free=True runs no reference model (no Mallows loss needs its entropies), so "
                f"{', '.join(conflicts)} would have nothing to do; drop them"
            )
    # padding_free=True is left to trl, as for DPOTrainer: trl 1.13 warns and falls back to padding
    # (DPOTrainer.__init__ sets self.padding_free = False), so the batches are padded here too. A trl
    # that packs would hand the loss position_ids; the packed API it would use is pyfastpo's
    # fused_preference_loss / linear_preference_loss(position_ids=...) (pyfastpo.packed).
    if problems:
        raise ValueError("FastDPOTrainer does not support: " + "; ".join(problems))
