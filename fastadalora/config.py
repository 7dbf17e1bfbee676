"""``AdaLoraConfig``: every field of PEFT 0.21's ``AdaLoraConfig``, validated up front.

A PEFT user switches by changing the import: field names, defaults, ``to_dict`` /
``save_pretrained`` / ``from_pretrained`` and the errors and warnings of PEFT's ``__post_init__``
are PEFT's.  Each inherited ``LoraConfig`` / ``PeftConfig`` field falls in one of four groups:

* **implemented** (the AdaLoRA fields, ``target_modules``, ``exclude_modules``,
  ``layers_to_transform``, ``layers_pattern``, ``modules_to_save``, ``bias``,
  ``init_lora_weights``, ``inference_mode``, ``task_type``, ``ensure_weight_tying``);
* **bookkeeping**, stored and written to ``adapter_config.json`` (``base_model_name_or_path``,
  ``revision``, ``peft_version``, ``auto_mapping``, ``megatron_core``, ``runtime_config`` (never
  written, as in PEFT));
* **no effect in AdaLoRA** — PEFT 0.21's AdaLoRA ignores them too, so the numbers are the same;
  we accept them and warn when one is set (``r`` with PEFT's own warning, ``use_rslora``,
  ``alpha_pattern``, ``lora_bias``, the LoRA-variant sub-configs, ``use_qalora``, ...);
* **rejected**, with PEFT's exception type and message where PEFT rejects them (``use_dora``,
  ``init_lora_weights='loftq'``) and a ``ValueError`` saying "not supported" where PEFT's AdaLoRA
  would do something we do not (``layer_replication``, ``trainable_token_indices``,
  ``target_parameters``, ``megatron_config``, ``alora_invocation_tokens``).

The config is validated when built and never mutated afterwards; what it rejects that PEFT
accepts is listed in the README's "Differences from PEFT".
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# The PEFT release whose AdaLoRA semantics and file format this package implements; written as
# ``peft_version`` into adapter_config.json and into the model card, where PEFT writes its own version.
PEFT_VERSION = "0.21.0"


class PeftType(str, enum.Enum):
    """PEFT's ``PeftType``, for the one type this package has: a str enum, ``PeftType.ADALORA == "ADALORA"``
    (JSON writes it as that string)."""

    ADALORA = "ADALORA"


CONFIG_NAME = "adapter_config.json"
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"

# task types for which PEFT adds the classification head to ``modules_to_save`` automatically
# fields PEFT's AdaLoraConfig does not have: training options of fastadalora, never written to adapter_config.json
FASTADALORA_ONLY = ("compact_at_final",)

TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# PEFT 0.21's TaskType values, in its order (its error message lists them so)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
# init_lora_weights strings PEFT 0.21's LoraConfig documents; its AdaLoRA treats every one but 'loftq'
# as True (the layers only test truthiness).
INIT_LORA_WEIGHTS_STRINGS = ("gaussian", "eva", "olora", "pissa", "pissa_niter_<n>", "corda", "loftq",
                             "orthogonal", "mica", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
# LoRA-only options that PEFT 0.21's AdaLoRA accepts and ignores: same numbers, a warning when set
_NO_EFFECT_CONFIGS = ("velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config")


@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime sub-config: never saved, never loaded (only DoRA reads it; AdaLoRA has no DoRA)."""

    ephemeral_gpu_offload: bool = field(
        default=False, metadata={"help": "PEFT: ephemeral GPU offloading of DoRA's initialisation; no effect here."})


@dataclass
class AdaLoraConfig:
    """Configuration of an AdaLoRA adapter (PEFT 0.21 field names and defaults).

    AdaLoRA has three phases.  Steps ``t <= tinit`` train at full rank ``init_r``; steps
    ``tinit < t < total_step - tfinal`` shrink the total rank budget along a cubic schedule,
    pruning every ``deltaT`` steps; at ``t == total_step - tfinal`` the budget reaches
    ``target_r`` per layer and the rank pattern is fixed for the remaining ``tfinal`` steps.
    """

    # ------------------------------------------------------------------ AdaLoRA
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
    # ------------------------------------------------------------------ which modules
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names (a module matches when its full name equals an entry or "
            "ends with '.' + entry), a string matched as a full regex against module names, or 'all-linear' "
            "(every nn.Linear / Conv1D except the output layer, as PEFT picks them). None picks PEFT's default "
            "for the model type (e.g. ['query', 'value'] for BERT)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules never to adapt, matched like target_modules."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Layer indices to adapt (an int or a list), read from the module path as PEFT reads it: "
                          "the number after `layers_pattern` (or after the second path component when no pattern "
                          "is given). Only with a list of target_modules (or None)."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name(s) of the nn.ModuleList holding the layers (e.g. 'layers', 'h'), used with "
                          "layers_to_transform; needs layers_to_transform and a list of target_modules."},
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
    bias: str = field(
        default="none",
        metadata={"help": "Which biases train, PEFT's modes: 'none'; 'all' (every parameter named 'bias' in the "
                          "model); 'lora_only' (the biases of the adapted layers)."})
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: E = 0 and A, B ~ N(0, 0.02), a no-op at start (PEFT). False: all randn. PEFT's "
                          "LoRA init names ('gaussian', 'pissa', ...) are accepted and, as in PEFT's AdaLoRA, act as "
                          "True (with a warning); 'loftq' is rejected, as in PEFT."},
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
    inference_mode: bool = field(
        default=False,
        metadata={"help": "PEFT's inference mode: adapters (and modules_to_save) frozen, no rank allocation. "
                          "Written as True to adapter_config.json, as PEFT does."})
    compact_at_final: bool = field(
        default=False,
        metadata={"help": "fastadalora only (not saved): at total_step - tfinal, when the final rank pattern is fixed, "
                          "drop the masked triplets for good (AdaLoraModel.compact_ranks). Needs the optimizer: pass "
                          "update_and_allocate(step, optimizer=...); AdaLoraCallback does."})
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "PEFT: keep tied weights tied. modules_to_save are trained in place here, so tied weights "
                          "stay tied; adapting a layer whose weight is tied to another module is refused."})
    # ------------------------------------------------------------------ bookkeeping (stored and saved)
    peft_type: str = field(default=PeftType.ADALORA, metadata={"help": "Always 'ADALORA' (accepted for PEFT parity)."})
    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "The base model's name or path, written to adapter_config.json."})
    revision: Optional[str] = field(
        default=None, metadata={"help": "The base model's revision, written to adapter_config.json."})
    peft_version: Optional[str] = field(
        default=None, metadata={"help": f"PEFT format version; None fills in {PEFT_VERSION!r}, the PEFT release "
                                        "whose format is written."})
    auto_mapping: Optional[dict] = field(
        default=None, metadata={"help": "PEFT's auto mapping ({'base_model_class', 'parent_library'}); written at "
                                        "save when task_type is None."})
    megatron_core: Optional[str] = field(
        default="megatron.core", metadata={"help": "PEFT's Megatron core module name; stored (megatron_config, "
                                                   "which would use it, is not supported)."})
    runtime_config: LoraRuntimeConfig = field(
        default_factory=LoraRuntimeConfig,
        metadata={"help": "PEFT's runtime options; never saved. Only DoRA reads them in PEFT: no effect here."})
    # ------------------------------------------------------------------ no effect in AdaLoRA (PEFT ignores them too)
    r: int = field(default=8, metadata={"help": "LoRA's rank: not used by AdaLoRA (use init_r); a value other than "
                                                "8 warns, as in PEFT."})
    use_rslora: bool = field(
        default=False, metadata={"help": "LoRA's rank-stabilised scaling: AdaLoRA's scaling is lora_alpha / ranknum "
                                         "whatever it says (as in PEFT); True warns."})
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "LoRA's per-layer alpha: not used by AdaLoRA (as in PEFT); a "
                                                "non-empty dict warns."})
    lora_bias: bool = field(
        default=False, metadata={"help": "LoRA's bias on B: AdaLoRA has none (PEFT's AdaLoRA ignores it); True warns."})
    use_qalora: bool = field(
        default=False, metadata={"help": "LoRA's QALoRA (GPTQ only): not used by AdaLoRA (as in PEFT); True warns."})
    qalora_group_size: int = field(
        default=16, metadata={"help": "QALoRA's pooling group size (> 0): only read with use_qalora."})
    eva_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA's EVA init config: not used by AdaLoRA (as in PEFT)."})
    corda_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA's CorDA init config: not used by AdaLoRA (as in PEFT)."})
    lora_ga_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA's LoRA-GA init config: not used by AdaLoRA (as in PEFT)."})
    loftq_config: Optional[dict] = field(
        default_factory=dict, metadata={"help": "LoftQ config: AdaLoRA does not support LoftQ; with "
                                                "init_lora_weights != 'loftq' it is dropped with PEFT's warning."})
    velora_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA variant VeLoRA: not used by AdaLoRA (as in PEFT); set warns."})
    monteclora_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA variant MonteCLoRA: not used by AdaLoRA (as in PEFT); set warns."})
    use_bdlora: Optional[dict] = field(
        default=None, metadata={"help": "LoRA variant BD-LoRA: not used by AdaLoRA (as in PEFT); set warns."})
    arrow_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA's Arrow routing: not used by AdaLoRA (as in PEFT); set warns."})
    kasa_config: Optional[dict] = field(
        default=None, metadata={"help": "LoRA variant KaSA: not used by AdaLoRA (as in PEFT); set warns."})
    # ------------------------------------------------------------------ not supported (raise when set)
    use_dora: bool = field(default=False, metadata={"help": "DoRA: AdaLoRA does not support it (PEFT raises too)."})
    layer_replication: Optional[list] = field(
        default=None, metadata={"help": "PEFT's layer replication: not supported (must be None)."})
    trainable_token_indices: Optional[Union[list[int], dict]] = field(
        default=None, metadata={"help": "PEFT's trainable tokens: not supported (must be None)."})
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "PEFT's nn.Parameter targets: not supported by AdaLoRA (must be None)."})
    megatron_config: Optional[dict] = field(
        default=None, metadata={"help": "Megatron parallel layers: not supported (must be None)."})
    alora_invocation_tokens: Optional[list[int]] = field(
        default=None, metadata={"help": "Activated LoRA: not supported by AdaLoRA (must be None)."})

    # ================================================================== validation
    def __post_init__(self):
        self._check_peft_rules()
        self._check_adalora_numbers()
        self._check_fields()

    def _check_peft_rules(self) -> None:
        """The errors and warnings of PEFT 0.21's LoraConfig / AdaLoraConfig ``__post_init__``, same types and texts."""
        if self.task_type is not None and _plain(self.task_type) not in TASK_TYPES:
            raise ValueError(f"Invalid task type: '{_plain(self.task_type)}'. Must be one of the following task "
                             f"types: {', '.join(TASK_TYPES)}. (`task_type`)")
        if _plain(self.peft_type) not in (None, "ADALORA"):
            warnings.warn(f"`peft_type={_plain(self.peft_type)!r}` is ignored: an AdaLoraConfig is always 'ADALORA' "
                          "(PEFT sets it the same way).")
        self.peft_type = PeftType.ADALORA
        if self.peft_version is None:
            self.peft_version = PEFT_VERSION
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA. (`use_dora=True`; AdaLoRA needs use_dora=False)")
        init = self.init_lora_weights
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'. "
                                 "(ADALORA does not support LOFTQ either: use init_lora_weights=True.)")
            raise ValueError("ADALORA does not support LOFTQ. (`init_lora_weights='loftq'` with `loftq_config`; "
                             "use init_lora_weights=True and loftq_config={}.)")
        if self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
        elif init == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.")
        elif init != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.")
        elif init == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.")
        elif init != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.")
        if self.lora_bias is True:
            if init not in (True, False):
                raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or "
                                 f"False, got init_lora_weights={init} instead.")
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"`r` must be an int (it is not used by AdaLoRA; use init_r), got {self.r!r}.")
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored."
                          "If you intended to set the initial rank, use `init_r` instead.")

    def _check_adalora_numbers(self) -> None:
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
        for name, lo in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1),
                         ("qalora_group_size", 1)):
            _int(name, lo)
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase: need "
                f"tinit < total_step - tfinal, got tinit={self.tinit}, tfinal={self.tfinal}, "
                f"total_step={self.total_step}. Decrease `tfinal`/`tinit` or increase `total_step`."
            )
        if self.target_r >= self.init_r:
            raise ValueError(
                f"`target_r` ({self.target_r}) must be smaller than `init_r` ({self.init_r}): AdaLoRA prunes from "
                "init_r down to target_r (PEFT accepts this and then crashes in kthvalue)."
            )
        for name in ("beta1", "beta2"):
            _real(name, 0.0, 1.0, lo_open=True, hi_open=True)
        if isinstance(self.orth_reg_weight, numbers.Real) and self.orth_reg_weight < 0:  # PEFT's words
            raise ValueError("`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                             f"{self.orth_reg_weight}")
        _real("orth_reg_weight", 0.0)
        _real("lora_alpha")
        _real("lora_dropout", 0.0, 1.0, hi_open=True)

    def _check_fields(self) -> None:
        for name in ("fan_in_fan_out", "inference_mode", "ensure_weight_tying", "use_rslora", "lora_bias",
                     "use_qalora", "use_dora", "compact_at_final"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        init = self.init_lora_weights
        if not isinstance(init, bool):
            if not isinstance(init, str) or not (init in INIT_LORA_WEIGHTS_STRINGS or _PISSA_NITER.fullmatch(init)):
                raise ValueError(f"`init_lora_weights` must be True, False or one of PEFT's init names "
                                 f"{list(INIT_LORA_WEIGHTS_STRINGS)}, got {init!r}.")
            warnings.warn(f"`init_lora_weights={init!r}` is a LoRA initialisation that AdaLoRA does not have: like "
                          "PEFT 0.21's AdaLoRA, fastadalora initialises as with init_lora_weights=True "
                          "(E = 0, A, B ~ N(0, 0.02)).")
        if self.bias not in BIAS_MODES and not (isinstance(self.bias, str) and self.bias.endswith("_only")):
            raise ValueError(f"`bias` must be one of {list(BIAS_MODES)} (PEFT reads any '<method>_only' as "
                             f"'lora_only'), got {self.bias!r}.")
        for name in ("target_modules", "exclude_modules"):
            _check_names(name, getattr(self, name), allow_regex=True)
        _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        self.layers_to_transform = _check_layers_to_transform(self.layers_to_transform)
        self.layers_pattern = _check_layers_pattern(self.layers_pattern)
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"`rank_pattern` must be None or a dict, got {type(self.rank_pattern).__name__}.")
        for name in ("base_model_name_or_path", "revision", "peft_version", "megatron_core"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string or None, got {value!r}.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ValueError(f"`auto_mapping` must be a dict or None, got {self.auto_mapping!r}.")
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        if not isinstance(self.alpha_pattern, dict):
            raise ValueError(f"`alpha_pattern` must be a dict, got {self.alpha_pattern!r}.")
        for name in ("eva_config", "corda_config", "lora_ga_config", "loftq_config", *_NO_EFFECT_CONFIGS):
            setattr(self, name, _sub_config(name, getattr(self, name)))
        if self.loftq_config is None:
            self.loftq_config = {}
        self.runtime_config = _runtime_config(self.runtime_config)

        unsupported = {
            "layer_replication": "PEFT's layer replication (it rebuilds the model's layer stack)",
            "trainable_token_indices": "PEFT's trainable token embeddings",
            "target_parameters": "adapters on nn.Parameters (PEFT's AdaLoRA cannot create them either)",
            "megatron_config": "Megatron parallel layers (PEFT's AdaLoRA has none either)",
            "alora_invocation_tokens": "Activated LoRA (PEFT's AdaLoRA layers cannot take the offsets it needs)",
        }
        for name, what in unsupported.items():
            value = getattr(self, name)
            if value not in (None, [], {}, ()):
                raise ValueError(f"`{name}={value!r}` is not supported: fastadalora has no {what}. Use {name}=None.")

        ignored = [("use_rslora", self.use_rslora, "AdaLoRA's scaling is lora_alpha / ranknum"),
                   ("alpha_pattern", bool(self.alpha_pattern), "every layer uses lora_alpha"),
                   ("lora_bias", self.lora_bias, "AdaLoRA's B has no bias"),
                   ("use_qalora", self.use_qalora, "QALoRA is a LoRA-on-GPTQ variant")]
        ignored += [(name, getattr(self, name) is not None, "it configures a LoRA variant")
                    for name in _NO_EFFECT_CONFIGS]
        for name, is_set, why in ignored:
            if is_set:
                warnings.warn(f"`{name}` has no effect in AdaLoRA ({why}); PEFT 0.21's AdaLoRA ignores it too.")

    # ================================================================== PEFT's config API
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """PEFT's fields as plain JSON-ready data (PEFT's ``to_dict``, without ``runtime_config``); the
        fastadalora-only training options (``FASTADALORA_ONLY``) are left out, so PEFT reads the file as its own."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name != "runtime_config" and f.name not in FASTADALORA_ONLY:
                out[f.name] = _plain_value(getattr(self, f.name))
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed), as PEFT's config does.

        ``auto_mapping_dict=...`` overrides ``auto_mapping`` in the file, as in PEFT; other keywords
        (PEFT's ``push_to_hub`` options) are accepted and ignored: nothing is uploaded.
        """
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output = self.to_dict()
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as writer:
            writer.write(json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: Optional[str] = None,
                        **kwargs) -> "AdaLoraConfig":
        """Read ``adapter_config.json`` from a local directory (PEFT's API; nothing is downloaded).

        As in PEFT, keyword arguments naming config fields fill only what the file lacks, and unknown
        keys in the file (from a newer PEFT) are dropped with PEFT's warning.
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder is not None \
            else os.fspath(pretrained_model_name_or_path)
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}' (fastadalora loads "
                             "local directories only; download the adapter first)")
        names = {f.name for f in dataclasses.fields(cls)}
        class_kwargs = {k: v for k, v in kwargs.items() if k in names}
        return cls.from_peft_type(**{**class_kwargs, **cls.from_json_file(config_file)})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs) -> dict[str, Any]:
        """The parsed JSON of a config file; a ``runtime_config`` entry is dropped with PEFT's warning."""
        with open(path_json_file) as file:
            json_object = json.load(file)
        if "runtime_config" in json_object:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                          "configurations are only valid at runtime.")
            del json_object["runtime_config"]
        return json_object

    @classmethod
    def from_peft_type(cls, **kwargs) -> "AdaLoraConfig":
        """A config from saved keyword arguments (PEFT's ``from_peft_type``): unknown keys are dropped with
        PEFT's forward-compatibility warning; a ``peft_type`` other than ADALORA is an error."""
        peft_type = _plain(kwargs.get("peft_type", "ADALORA"))
        if peft_type != "ADALORA":
            raise ValueError(f"This is a {peft_type!r} adapter config, not an AdaLoRA one (`peft_type` must be "
                             f"'ADALORA', got {peft_type!r}).")
        names = {f.name for f in dataclasses.fields(cls)}
        unexpected = sorted(set(kwargs) - names)
        if unexpected:
            kwargs = {k: v for k, v in kwargs.items() if k in names}
            if "peft_type" not in kwargs:
                raise TypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                                "{'peft_type'}.")
            warnings.warn(
                f"Unexpected keyword arguments {unexpected} for class {cls.__name__}, these are ignored. This "
                "probably means that you're loading a configuration file that was saved using a higher version of "
                "the library and additional parameters have been introduced since. It is highly recommended to "
                "upgrade the PEFT version before continuing (e.g. by running `pip install -U peft`).")
        return cls(**kwargs)

    @classmethod
    def check_kwargs(cls, **kwargs):
        return kwargs

    @classmethod
    def of(cls, config, what: str = "config") -> "AdaLoraConfig":
        """``config`` as this class: a ``peft.AdaLoraConfig`` is converted (``from_peft``), anything else but
        an ``AdaLoraConfig`` is a ``TypeError`` naming ``what``."""
        if type(config).__module__.startswith("peft.") and type(config).__name__ == "AdaLoraConfig":
            return cls.from_peft(config)
        if not isinstance(config, cls):
            raise TypeError(f"{what} must be a fastadalora.AdaLoraConfig (or a peft.AdaLoraConfig), got "
                            f"{type(config).__name__}")
        return config

    @classmethod
    def from_peft(cls, peft_config) -> "AdaLoraConfig":
        """Our config from a ``peft.AdaLoraConfig``, every field converted, so code that builds PEFT configs runs.

        Sets become sorted lists, enums their values, sub-config dataclasses dicts; live rank-pattern keys
        lose PEFT's adapter name (``....lora_E.default`` -> ``....lora_E``).  A field this class does not
        know, set to anything but an empty value, is an error naming it.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(peft_config):
            value = getattr(peft_config, f.name)
            if f.name not in names:
                if value not in (None, False, {}, [], ()):
                    raise ValueError(f"`{f.name}={value!r}` of the peft.AdaLoraConfig is not supported by "
                                     "fastadalora.")
                continue
            if f.name == "runtime_config":
                kwargs[f.name] = _runtime_config(value)
                continue
            value = _plain_value(value)
            if f.name == "rank_pattern" and value:
                value = {k[: -len(".default")] if k.endswith(".default") else k: v for k, v in value.items()}
            kwargs[f.name] = value
        return cls(**kwargs)

    # ================================================================== used by the model
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


# ====================================================================== helpers
def _plain(value):
    """PEFT's ``TaskType``/``PeftType`` are str enums: compare by value."""
    return getattr(value, "value", value)


def _plain_value(value):
    """JSON-ready data: enums by value, sets as sorted lists, tuples as lists, dataclasses as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_value(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {_plain(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain_value(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return copy.deepcopy(_plain(value))


def _sub_config(name: str, value):
    """A PEFT sub-config (EvaConfig, LoftQConfig, ...) as a dict; None stays None."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_value(value)
    if isinstance(value, dict):
        return value
    raise ValueError(f"`{name}` must be None, a dict or PEFT's config object for it, got {value!r}.")


def _runtime_config(value) -> LoraRuntimeConfig:
    if value is None:
        return LoraRuntimeConfig()
    if isinstance(value, LoraRuntimeConfig):
        return value
    if isinstance(value, dict) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        data = value if isinstance(value, dict) else dataclasses.asdict(value)
        unknown = sorted(set(data) - {"ephemeral_gpu_offload"})
        if unknown or not isinstance(data.get("ephemeral_gpu_offload", False), bool):
            raise ValueError(f"`runtime_config` must hold only ephemeral_gpu_offload (a bool), got {data!r}.")
        return LoraRuntimeConfig(**data)
    raise ValueError(f"`runtime_config` must be a LoraRuntimeConfig or a dict, got {value!r}.")


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layers_to_transform(value):
    if value is None or _is_index(value):
        return value
    if isinstance(value, (list, tuple)) and all(_is_index(v) for v in value):
        return list(value)
    raise ValueError(f"`layers_to_transform` must be None, a layer index (an int >= 0) or a list of them, "
                     f"got {value!r}.")


def _check_layers_pattern(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"`layers_pattern` must be None, a string or a list of strings (names of the layer "
                     f"nn.ModuleList, e.g. 'layers'), got {value!r}.")


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
