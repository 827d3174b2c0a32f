"""`SEFTConfig`: the configuration of a SEFT adapter (see ../shared/SEFT_METHOD.md for the method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..utils.sparsity import parse_nm_pattern
from .registration import SEFT_PEFT_TYPE

DROP_CRITERIA = ("magnitude", "gradient")
DROP_SCHEDULES = ("cosine", "linear")
PRUNE_CRITERIA = ("sensitivity", "magnitude", "wanda")
WINDOW_STATISTICS = ("abs_sum", "mean_abs")
GROWTH_STATISTICS = (*WINDOW_STATISTICS, "consistent")
SENSITIVITY_STATISTICS = (*WINDOW_STATISTICS, "rms")
GROWTH_NORMALIZATIONS = ("none", "input", "input_output")
GROWN_OPTIMIZER_STATES = ("zero", "warmup", "seed")


@dataclass
class SEFTConfig(PeftConfig):
    """Configuration of a SEFT (Sparsity Evolution Fine-Tuning) adapter.

    SEFT trains values at a small, evolving set of positions of each target weight. Every
    ``update_interval`` optimizer steps the positions with the smallest values are dropped, the positions
    with the largest accumulated gradients (pruned positions included) are grown, and the least sensitive
    frozen weights are pruned so that every layer keeps exactly as many non-zeros as its base weight had.
    """

    density: float = field(
        default=0.01,
        metadata={
            "help": "Fraction of each target weight that is trainable: K = round(density * out * in) values per layer. "
            "Ignored when `num_trainable` is set."
        },
    )
    num_trainable: int | None = field(
        default=None,
        metadata={
            "help": "Absolute total number of trainable values, split over the target layers in proportion to their "
            "size. Overrides `density` when set."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (or suffixes), a regex, or 'all-linear'. Default: every linear projection inside "
            "the numbered transformer blocks (never the LM head or the embeddings). nn.Linear and transformers' "
            "Conv1D are supported."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (or suffixes), or a regex, of modules never to adapt."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules apart from SEFT layers that are fully trained and saved (e.g. a classifier head)."},
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Token indices of the embedding matrix to train sparsely (PEFT's trainable tokens); a list for the "
            "input embedding, or a dict of embedding-module name to indices."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Only adapt the blocks with these indices (default: all blocks); applies to the default targets, "
            "to lists and to 'all-linear', and the budget is split over the adapted layers only."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the block list, used with `layers_to_transform` (e.g. 'layers' or 'h')."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Start the trainable values at zero so the adapted model equals the base model exactly. "
            "False starts them at small random values (for tests only)."
        },
    )
    random_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed for the initial random positions; None uses torch's global generator (so two adapters "
            "differ unless the user seeds torch)."
        },
    )
    update_interval: int = field(
        default=20,
        metadata={"help": "Optimizer steps between two evolution rounds (drop, grow, re-prune)."},
    )
    selection_steps: int = field(
        default=5,
        metadata={
            "help": "Number of optimizer steps before each round whose gradients are accumulated for growth and "
            "sensitivity. At most `update_interval`."
        },
    )
    initial_drop_rate: float = field(
        default=0.2,
        metadata={
            "help": "Fraction of the trainable positions replaced in the first round; decays to 0 at `total_steps`. "
            "0 turns evolution off (a static sparse delta)."
        },
    )
    drop_schedule: Literal["cosine", "linear"] = field(
        default="cosine",
        metadata={"help": "Decay of the drop rate from `initial_drop_rate` to 0: 'cosine' or 'linear'."},
    )
    drop_criterion: Literal["magnitude", "gradient"] = field(
        default="magnitude",
        metadata={
            "help": "Which trainable entries a round drops: 'magnitude', the smallest |delta| (the paper, SpIEL), or "
            "'gradient', the smallest window growth score (`growth_statistic`), so an entry keeps its slot while its "
            "gradient is as useful as the candidates' (an entry grown one interval ago has had few steps, so its "
            "|delta| is small whatever its use)."
        },
    )
    full_reselection_first: bool = field(
        default=False,
        metadata={
            "help": "SpIEL's option: the first round re-selects all positions (drop rate 1.0), replacing the random "
            "initial positions with gradient-chosen ones."
        },
    )
    grow_pruned: bool | None = field(
        default=None,
        metadata={
            "help": "Allow growth into positions that are zero in the base weight or were pruned by SEFT "
            "(re-activation). False restricts growth to currently active weights. None (default): True without "
            "`pattern`, False with it (the paper's frozen-topology N:M mode). True with `pattern` is this package's "
            "extension, not in the paper: a re-activation is paid for inside its N:M group."
        },
    )
    prune_criterion: Literal["sensitivity", "magnitude", "wanda"] = field(
        default="sensitivity",
        metadata={
            "help": "Score used to choose which frozen weights pay for re-activated ones: 'sensitivity' (first-order "
            "Taylor |W * G|, see `sensitivity_statistic`), 'magnitude' |W|, or 'wanda' |W|*||X_col||."
        },
    )
    growth_statistic: Literal["abs_sum", "mean_abs", "consistent"] = field(
        default="abs_sum",
        metadata={
            "help": "How the window's optimizer-step gradients g of a position become its growth score: 'abs_sum' "
            "|sum of g| (RigL, SpIEL: noise cancels), 'mean_abs' mean |g|, or 'consistent' (sum of g)^2 - sum of "
            "g^2, the sum of products of different steps' gradients (a one-step spike adds nothing; needs "
            "selection_steps >= 2)."
        },
    )
    growth_normalization: Literal["none", "input", "input_output"] = field(
        default="none",
        metadata={
            "help": "'input' divides each position's growth score by the RMS of its input feature over the window "
            "(|g_ij| / ||x_j||, the gradient in the coordinates Wanda prunes in). Adam moves a weight by about the "
            "learning rate whatever its input's scale, so the output moves by that times ||x_j||: raw |g| favours "
            "weights on a few large-activation inputs, whose steps overshoot at higher learning rates. "
            "'input_output' also divides by the RMS of the output's gradient (|g_ij| / (||x_j|| ||e_i||), a "
            "correlation), so growth does not pile into the few outputs with the largest gradient. 'none': raw."
        },
    )
    sensitivity_statistic: Literal["abs_sum", "mean_abs", "rms"] = field(
        default="abs_sum",
        metadata={
            "help": "Sensitivity of a frozen weight W for re-pruning (and of a pruned one for restoring): 'abs_sum' "
            "|W * sum of g| over the window (first-order Taylor), 'mean_abs' mean |W * g|, or 'rms' "
            "|W| * sqrt(mean g^2), which ranks as Optimal Brain Damage's W^2 F / 2 with the window's empirical "
            "Fisher F: a weight whose gradient changes sign between steps counts as sensitive, where first-order "
            "Taylor calls it harmless."
        },
    )
    candidate_factor: float = field(
        default=4.0,
        metadata={
            "help": "Each window tracks exact gradient sums at candidate_factor * d growth candidates and as many "
            "prune candidates (d = positions the coming round replaces), chosen on the window's first micro-batch. "
            "Larger values find more of the exact best positions at a higher window cost."
        },
    )
    grown_optimizer_state: Literal["zero", "warmup", "seed"] = field(
        default="zero",
        metadata={
            "help": "Optimizer state of a slot whose position changed. 'zero': zeroed, for any torch optimizer (with "
            "Adam the first update of a grown entry is then about 0.5x an established entry's early in training and "
            "about 3x late). Adam family only: 'warmup' seeds the second moment with the window's mean square "
            "gradient and zeroes the first, so the entry's updates ramp up with its momentum from (1 - beta1) of "
            "an established entry's size at any step; 'seed' seeds both moments with the window's mean and mean "
            "square (SpIEL): full-size first updates, which made every round spike the loss on Wanda-70% SmolLM2."
        },
    )
    total_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer step at which the drop rate reaches 0 and evolution stops. Defaults to the Trainer's "
            "max steps; a plain PyTorch loop must set it."
        },
    )
    pattern: str | None = field(
        default=None,
        metadata={
            "help": "None for unstructured sparsity, or an 'N:M' string (e.g. '2:4'): every group of M consecutive "
            "input weights of the base holds at most N non-zeros, and every evolution round keeps each group's "
            "non-zero count."
        },
    )

    # PEFT's target matching reads this attribute; SEFT adapts modules, never bare parameters.
    target_parameters = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SEFT_PEFT_TYPE
        if self.grow_pruned is None:
            self.grow_pruned = self.pattern is None
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"SEFTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}.")

        if not isinstance(self.density, int | float) or not 0 < self.density <= 1:
            fail("density", "it must be a fraction in (0, 1]")
        if self.num_trainable is not None and (not isinstance(self.num_trainable, int) or self.num_trainable < 1):
            fail("num_trainable", "it must be a positive integer or None")
        if not isinstance(self.update_interval, int) or self.update_interval < 1:
            fail("update_interval", "it must be a positive integer")
        if not isinstance(self.selection_steps, int) or not 1 <= self.selection_steps <= self.update_interval:
            fail("selection_steps", f"it must be an integer between 1 and update_interval ({self.update_interval})")
        if not isinstance(self.initial_drop_rate, int | float) or not 0 <= self.initial_drop_rate <= 1:
            fail("initial_drop_rate", "it must be in [0, 1]")
        if self.drop_schedule not in DROP_SCHEDULES:
            fail("drop_schedule", f"allowed values are {DROP_SCHEDULES}")
        if self.drop_criterion not in DROP_CRITERIA:
            fail("drop_criterion", f"allowed values are {DROP_CRITERIA}")
        if self.prune_criterion not in PRUNE_CRITERIA:
            fail("prune_criterion", f"allowed values are {PRUNE_CRITERIA}")
        for name, allowed in (
            ("growth_statistic", GROWTH_STATISTICS),
            ("growth_normalization", GROWTH_NORMALIZATIONS),
            ("sensitivity_statistic", SENSITIVITY_STATISTICS),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"allowed values are {allowed}")
        if self.growth_statistic == "consistent" and self.selection_steps < 2:
            fail(
                "growth_statistic",
                "'consistent' compares the gradients of different steps: it needs selection_steps >= 2",
            )
        if not isinstance(self.candidate_factor, int | float) or not self.candidate_factor >= 1:
            fail("candidate_factor", "it must be a number >= 1")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            fail("total_steps", "it must be a positive integer or None (then the Trainer's max steps are used)")
        if self.pattern is not None:
            try:
                parse_nm_pattern(self.pattern)
            except ValueError as error:
                fail("pattern", f"{error} Use None for unstructured sparsity")
        if self.grown_optimizer_state not in GROWN_OPTIMIZER_STATES:
            fail("grown_optimizer_state", f"allowed values are {GROWN_OPTIMIZER_STATES}")
        for name in ("grow_pruned", "init_weights", "full_reselection_first"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "it must be True or False")
