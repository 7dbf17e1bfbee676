"""``AdaLoraConfig``: the fields of PEFT 0.21's ``AdaLoraConfig`` that AdaLoRA uses, validated up front.

A PEFT user switches by changing the import: field names and defaults are PEFT's.  The config is
validated when built and never mutated afterwards; what that rejects that PEFT accepts is listed
in the README's "Differences from PEFT".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

# task types for which PEFT adds the classification head to ``modules_to_save`` automatically
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


@dataclass
class AdaLoraConfig:
    """Configuration of an AdaLoRA adapter (PEFT 0.21 field names and defaults).

    AdaLoRA has three phases.  Steps ``t <= tinit`` train at full rank ``init_r``; steps
    ``tinit < t < total_step - tfinal`` shrink the total rank budget along a cubic schedule,
    pruning every ``deltaT`` steps; at ``t == total_step - tfinal`` the budget reaches
    ``target_r`` per layer and the rank pattern is fixed for the remaining ``tfinal`` steps.
    """

    init_r: int = field(default=12, metadata={"help": "Initial rank of every adapted matrix."})
    target_r: int = field(
        default=8, metadata={"help": "Target average rank per adapted matrix at the end of the budgeting phase."}
    )
    tinit: int = field(default=0, metadata={"help": "Steps of initial warm-up at full rank before any pruning."})
    tfinal: int = field(default=0, metadata={"help": "Steps of final fine-tuning with a fixed rank pattern."})
    deltaT: int = field(default=1, metadata={"help": "Interval, in steps, between two budget allocations (>= 1)."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity smoothing, in (0, 1)."})
    beta2: float = field(
        default=0.85, metadata={"help": "EMA coefficient of the uncertainty quantification, in (0, 1)."}
    )
    orth_reg_weight: float = field(
        default=0.5, metadata={"help": "Coefficient of the orthogonal regularisation added to the loss (>= 0)."}
    )
    total_step: Optional[int] = field(
        default=None, metadata={"help": "Total number of optimizer steps of the run (required, > 0)."}
    )
    lora_alpha: float = field(
        default=8, metadata={"help": "Adapter scaling: the branch is multiplied by lora_alpha / (ranknum + 1e-5)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input, in [0, 1)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names (a module matches when its full name equals an entry or "
            "ends with '.' + entry), or a string matched as a full regex against module names. None picks "
            "PEFT's default for the model type (e.g. ['query', 'value'] for BERT)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules never to adapt, matched like target_modules."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules, besides the adapters, that stay trainable (e.g. ['classifier']); matched like "
            "target_modules and never adapted themselves."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "Whether the target stores its weight as (in, out). Informational: the layout is taken from "
            "each module's type (transformers Conv1D is fan_in_fan_out, nn.Linear is not)."
        },
    )
    bias: str = field(default="none", metadata={"help": "Which biases train; only 'none' is supported."})
    init_lora_weights: bool = field(
        default=True,
        metadata={"help": "True: E = 0 and A, B ~ N(0, 0.02), a no-op at start (PEFT). False: all randn."},
    )
    task_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "PEFT task type. 'SEQ_CLS'/'TOKEN_CLS' add 'classifier' and 'score', 'QUESTION_ANS' adds "
            "'qa_outputs' to modules_to_save, as PEFT does."
        },
    )
    rank_pattern: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Read-only: the rank pattern of a saved checkpoint, {'<module path>.lora_E': [bool] * init_r}. "
            "Filled in by AdaLoraModel.export_config(); never written during training."
        },
    )
    peft_type: str = field(default="ADALORA", metadata={"help": "Always 'ADALORA' (accepted for PEFT parity)."})

    def __post_init__(self):
        def _int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an int, got {value!r}.")
            return value

        if self.total_step is None or _int("total_step") <= 0:
            raise ValueError(
                f"AdaLoRA needs `total_step`, the number of optimizer steps of the run, as an int > 0; "
                f"got {self.total_step!r}."
            )
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            _int(name)
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"`tinit` and `tfinal` must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The schedule leaves no budgeting phase: need tinit < total_step - tfinal, got "
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step}. "
                "Decrease `tinit`/`tfinal` or increase `total_step`."
            )
        if self.target_r < 0:
            raise ValueError(f"`target_r` must be >= 0, got {self.target_r}.")
        if self.target_r >= self.init_r:
            raise ValueError(
                f"`target_r` ({self.target_r}) must be smaller than `init_r` ({self.init_r}): AdaLoRA prunes from "
                "init_r down to target_r (PEFT accepts this and then crashes in kthvalue)."
            )
        if self.deltaT < 1:
            raise ValueError(f"`deltaT` must be >= 1, got {self.deltaT}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must lie strictly between 0 and 1, got {value}.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` must be >= 0, got {self.orth_reg_weight}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must lie in [0, 1), got {self.lora_dropout}.")
        if self.bias != "none":
            raise ValueError(
                f"`bias={self.bias!r}` is not supported: fastadalora trains no biases of adapted layers; use "
                "bias='none' (the default), and list modules whose parameters should train in `modules_to_save`."
            )
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"`init_lora_weights` must be True or False, got {self.init_lora_weights!r}.")
        for name in ("target_modules", "exclude_modules"):
            _check_names(name, getattr(self, name), allow_regex=True)
        _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        if self.task_type is not None and _plain(self.task_type) not in (
            "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"
        ):
            raise ValueError(f"Unknown `task_type` {self.task_type!r}.")
        if _plain(self.peft_type) != "ADALORA":
            raise ValueError(f"`peft_type` must be 'ADALORA', got {self.peft_type!r}.")

    def head_modules(self) -> tuple[str, ...]:
        """The modules kept trainable: ``modules_to_save`` plus the head PEFT adds for ``task_type``."""
        names = list(self.modules_to_save or [])
        for name in TASK_HEADS.get(_plain(self.task_type), ()):
            if name not in names:
                names.append(name)
        return tuple(names)


def _plain(value):
    """PEFT's ``TaskType``/``PeftType`` are str enums: compare by value."""
    return getattr(value, "value", value)


def _check_names(name: str, value, allow_regex: bool) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if allow_regex:
            return
        raise ValueError(f"`{name}` must be a list of module names, got the string {value!r}.")
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be a list of module names{' or a regex string' if allow_regex else ''}, "
                         f"got {value!r}.")
    if len(value) == 0 and name == "target_modules":
        raise ValueError(f"`{name}` is empty; pass None or at least one module name.")
