"""``AdaLoraConfig``: the fields of PEFT 0.21's ``AdaLoraConfig`` that AdaLoRA uses, validated up front.

A PEFT user switches by changing the import: field names and defaults are PEFT's.  The config is
validated when built and never mutated afterwards; what that rejects that PEFT accepts is listed
in the README's "Differences from PEFT".
"""

from __future__ import annotations

import math
import numbers
import re
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
        default=None,
        metadata={"help": "Total number of optimizer steps of the run (> 0). None only with AdaLoraCallback, which "
                          "fills it from the Trainer's max_steps at train start."},
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
        def _int(name, lo):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r} ({type(value).__name__}).")
            if value < lo:
                raise ValueError(f"`{name}` must be an int >= {lo}, got {value}.")
            return value

        def _real(name, lo=None, hi=None, lo_open=False, hi_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite, got {value!r}.")
            low_bad = lo is not None and (value <= lo if lo_open else value < lo)
            high_bad = hi is not None and (value >= hi if hi_open else value > hi)
            if low_bad or high_bad:
                interval = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                            f"{'inf' if hi is None else hi}{')' if hi_open else ']'}")
                raise ValueError(f"`{name}` must lie in {interval}, got {value}.")
            return value

        if self.total_step is not None:
            _int("total_step", 1)
        for name, lo in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            _int(name, lo)
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The schedule leaves no budgeting phase: need tinit < total_step - tfinal, got "
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step}. "
                "Decrease `tinit`/`tfinal` or increase `total_step`."
            )
        if self.target_r >= self.init_r:
            raise ValueError(
                f"`target_r` ({self.target_r}) must be smaller than `init_r` ({self.init_r}): AdaLoRA prunes from "
                "init_r down to target_r (PEFT accepts this and then crashes in kthvalue)."
            )
        for name in ("beta1", "beta2"):
            _real(name, 0.0, 1.0, lo_open=True, hi_open=True)
        _real("orth_reg_weight", 0.0)
        _real("lora_alpha")
        _real("lora_dropout", 0.0, 1.0, hi_open=True)
        for name in ("fan_in_fan_out", "init_lora_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.bias != "none":
            raise ValueError(
                f"`bias={self.bias!r}` is not supported: fastadalora trains no biases of adapted layers; use "
                "bias='none' (the default), and list modules whose parameters should train in `modules_to_save`."
            )
        for name in ("target_modules", "exclude_modules"):
            _check_names(name, getattr(self, name), allow_regex=True)
        _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        if self.task_type is not None and _plain(self.task_type) not in (
            "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"
        ):
            raise ValueError(f"Unknown `task_type` {self.task_type!r}.")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"`rank_pattern` must be None or a dict, got {type(self.rank_pattern).__name__}.")
        if _plain(self.peft_type) != "ADALORA":
            raise ValueError(f"`peft_type` must be 'ADALORA', got {self.peft_type!r}.")

    @classmethod
    def from_peft(cls, peft_config) -> "AdaLoraConfig":
        """Our config from a ``peft.AdaLoraConfig`` (field by field), so code that builds PEFT configs runs."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)
                  if f.name in names and f.name != "rank_pattern"}
        if isinstance(kwargs.get("target_modules"), (set, frozenset)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)

    def require_total_step(self) -> int:
        """``total_step``, or a ``ValueError`` saying how to provide it."""
        if self.total_step is None:
            raise ValueError(
                "AdaLoRA needs `total_step`, the number of optimizer steps of the run, and this config has "
                "total_step=None: pass AdaLoraConfig(total_step=...) or train with transformers.Trainer and "
                "fastadalora.AdaLoraCallback(), which fills it from the Trainer's max_steps at train start.")
        return self.total_step

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
        if not allow_regex:
            raise ValueError(f"`{name}` must be a list of module names, got the string {value!r}.")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"`{name}` is not a valid regular expression: {value!r} ({exc}).") from None
        return
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be a list of module names{' or a regex string' if allow_regex else ''}, "
                         f"got {value!r}.")
    if len(value) == 0 and name == "target_modules":
        raise ValueError(f"`{name}` is empty; pass None or at least one module name.")
