"""``AdaLoraModel``: targeting, injection, the training-time hooks (orthogonal term, rank allocation).

``get_adalora_model(model, config)`` replaces every targeted ``nn.Linear`` / transformers
``Conv1D`` of ``model`` by an ``AdaLoraLinear`` *in place*, freezes everything except the
adapters and ``modules_to_save``, and returns an ``AdaLoraModel`` wrapping it.  The training
loop is PEFT's::

    loss = model(**batch).loss          # orthogonal term included (training mode)
    loss.backward()
    optimizer.step()
    model.update_and_allocate(step)     # step = 0, 1, 2, ... : the index of this optimizer step
    optimizer.zero_grad()

Rank-pattern keys.  PEFT's ``peft_model.peft_config["default"].rank_pattern`` is keyed by the
parameter name relative to the user's model, with the adapter name: while training
``"bert.encoder.layer.0.attention.self.query.lora_E.default"``; once saved (PEFT strips
``".default"`` and rewrites its live config) ``"bert.encoder.layer.0.attention.self.query.lora_E"``,
which is also the key in ``adapter_config.json``.  ``AdaLoraModel.rank_pattern`` uses the saved
form, ``"<module path in .model>.lora_E"``: the same string PEFT writes to disk.  PEFT's tensor
keys in ``adapter_model.safetensors`` add the prefix ``"base_model.model."``.

What differs from PEFT 0.21 on purpose is listed once, in the README's "Differences from PEFT".
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import operator
import os
import warnings

import torch
from torch import nn

from . import checkpoint, peft_math, targeting
from .checkpoint import peft_format
from .config import TASK_HEADS, AdaLoraConfig, PeftType
from .layers import AdapterLayer, InferenceAdapter, adapter_class
from .orth import OrthRegularizer

_EXTRA_STATE_FORMAT = "fastadalora.AdaLoraModel"


# --------------------------------------------------------------------------- model
class _BoundForward(functools.partial):
    """``AdaLoraModel.forward`` bound to an instance, whose signature is the wrapped model's forward.

    ``transformers.Trainer`` keeps only the batch columns named in ``inspect.signature(model.forward)``
    (it special-cases PEFT's PeftModel the same way); with a bare ``(*args, **kwargs)`` it would drop
    every input.  The signature is computed only when asked for.
    """

    @property
    def __signature__(self):
        return inspect.signature(self.args[0].model.forward)


class _advertises_model_signature:
    """Method descriptor returning a ``_BoundForward`` instead of a plain bound method.

    On the class, the method's signature also names ``labels``: ``transformers.Trainer`` takes its
    ``label_names`` from the class's forward (``find_labels(type(model))``, which for PEFT's models
    looks through to the base model's class), and without them it computes no evaluation loss.
    ``labels`` is what every transformers head but question answering takes (for those pass
    ``TrainingArguments(label_names=["start_positions", "end_positions"])``, as with any wrapper).
    """

    def __init__(self, fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        labels = inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None)
        fn.__signature__ = sig.replace(parameters=[*params, labels, sig.parameters["kwargs"]])
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, objtype=None):
        return self.fn if obj is None else _BoundForward(self.fn, obj)


class AdaLoraModel(nn.Module):
    """The user's model with AdaLoRA adapters, plus the hooks a training loop calls.

    Attributes:
        model: the user's model, changed in place (targets replaced by ``AdaLoraLinear``).
        adalora_config: a private copy of the config (the user's object is never touched).
        allocator: the ``RankAllocator`` (``state_dict``/``load_state_dict`` for exact resume).

    Unknown attributes are looked up on ``model`` (``.config``, ``.generate``, ...), as PEFT does.
    """

    prefix = "lora_"  # PEFT's tuner prefix: every adapter parameter's name contains it

    def __init__(self, model: nn.Module, config: AdaLoraConfig, autocast_adapter_dtype: bool = True,
                 adapter_name: str = "default") -> None:
        super().__init__()
        config = AdaLoraConfig.of(config)
        if not isinstance(autocast_adapter_dtype, bool):
            raise ValueError(f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        config = copy.deepcopy(config)
        # every check first: the model is untouched if any fails
        targets = targeting.find_targets(model, config, (AdapterLayer,))
        names = [k for k, _ in model.named_modules() if k]
        task_heads = TASK_HEADS.get(getattr(config.task_type, "value", config.task_type), ())
        for head in config.modules_to_save or ():  # the task type's own heads may be absent (PEFT appends them)
            if head not in task_heads and not any(targeting.name_matches([head], k) for k in names):
                raise ValueError(f"`modules_to_save` entry {head!r} matches no module of the model.")
        heads = targeting.find_heads(model, config.head_modules())
        if any(targeting.is_conv1d(m) != config.fan_in_fan_out for _, m in targets):
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit every target; each module uses its own layout "
                "(Conv1D: fan_in_fan_out=True, nn.Linear: False), as PEFT ends up doing."
            )

        # Created in named_modules order, each drawing randn(A), randn(E), randn(B), randn(1) and then
        # the init, so the torch RNG stream (and the initial weights) are PEFT's.
        flags = [(p, p.requires_grad) for _, m in targets for p in m.parameters()]
        try:
            layers = {}
            for path, module in targets:
                layers[path] = adapter_class(targeting.layer_kind(module))(
                    module, r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights, name=path,
                    adapter_dtype=adapter_dtype(_weight_dtype(module), autocast_adapter_dtype),
                )
            from .allocator import RankAllocator

            allocator = None if config.inference_mode else RankAllocator(  # inference: loading only
                list(layers.items()), init_r=config.init_r, target_r=config.target_r, tinit=config.tinit,
                tfinal=config.tfinal, total_step=config.total_step, deltaT=config.deltaT, beta1=config.beta1,
                beta2=config.beta2,
            )
        except BaseException:
            for p, flag in flags:  # AdaLoraLinear froze its base layer: undo, the model stays as it was
                p.requires_grad_(flag)
            raise

        # from here on the model changes
        for path, layer in layers.items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        model.requires_grad_(False)
        if not config.inference_mode:
            for layer in layers.values():
                for p in layer.adapter_params():
                    p.requires_grad_(True)
            for head in heads.values():
                head.requires_grad_(True)
            for p in _bias_params(model, layers, config.bias).values():  # PEFT's bias="all" / "lora_only"
                p.requires_grad_(True)

        self.model = model
        self.adalora_config = config
        self._adapters = layers  # plain dicts (the modules are registered once, inside .model)
        self._heads = heads
        self.allocator = allocator
        self._orth = OrthRegularizer()
        self.adapter_name = adapter_name
        self._active = adapter_name  # the adapter the forward runs (set_adapter)
        self._inference_configs: dict[str, AdaLoraConfig] = {}  # adapters load_adapter added, by name
        for layer in layers.values():
            layer.adapter_name = layer.active_adapter = adapter_name

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_adapters", "_heads", "_orth", "allocator", "adalora_config", "adapter_name", "_active",
                        "_inference_configs"):
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "AdaLoraModel":
        """``self``, so PEFT code written as ``model.base_model.update_and_allocate(step)`` keeps working.

        (In PEFT, ``PeftModel.base_model`` is the tuner and ``.base_model.model`` the user's model;
        here both paths lead to the same objects.)
        """
        return self

    def get_base_model(self) -> nn.Module:
        """The user's model (PEFT's ``PeftModel.get_base_model``)."""
        return self.model

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' ``resize_token_embeddings``, refused when the output embedding carries an adapter.

        transformers rebuilds the output layer as a plain ``nn.Linear``, which would drop the adapter
        silently: resize before ``get_adalora_model`` (PEFT fails here too, with a ``KeyError``).
        """
        get_output = getattr(self.model, "get_output_embeddings", None)
        head = get_output() if callable(get_output) else None
        if isinstance(head, AdapterLayer):
            raise ValueError(
                f"resize_token_embeddings: the output embedding {head.name!r} has an AdaLoRA adapter, which resizing "
                "would replace by a plain layer. Resize the base model's embeddings before get_adalora_model, or "
                "exclude the output layer from target_modules.")
        return self.model.resize_token_embeddings(*args, **kwargs)

    # ------------------------------------------------------------------ adapters
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """``{module path in .model: adapter layer}`` in ``named_modules`` order."""
        return dict(self._adapters)

    def head_modules(self) -> dict[str, nn.Module]:
        """``{module path in .model: module}`` of the heads trained in full (``modules_to_save``, task heads)."""
        return dict(self._heads)

    def live_masks(self) -> dict[str, list[bool] | None]:
        """Per adapter path, the latest keep-mask over the triplets the layer holds (None: no mask yet)."""
        pattern = self.rank_pattern or {}
        return {path: pattern.get(f"{path}.lora_E") for path in self._adapters}

    # ------------------------------------------------------------------ training hooks
    @_advertises_model_signature
    def forward(self, *args, **kwargs):
        """Call the model; in training mode add ``orth_reg_weight · orth_reg_loss()`` to a tensor ``.loss``.

        Unlike PEFT, nothing is added in eval mode.
        """
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        weight = self.adalora_config.orth_reg_weight
        if self.training and isinstance(loss, torch.Tensor) and weight > 0 and self._adapters and self.allocator:
            outputs.loss = loss + weight * self.orth_reg_loss()
        return outputs

    def orth_reg_loss(self) -> torch.Tensor:
        """``R = mean over every A and B of ‖G − I‖_F`` (``G = A·Aᵀ``, ``Bᵀ·B``), PEFT's order: A then B per layer."""
        if not self._adapters:
            raise RuntimeError("The model has no adapters left (merge_and_unload was called).")
        triples = [layer.adapter_params() for layer in self._adapters.values()]
        return self._orth([t[0] for t in triples], [t[2] for t in triples])

    def update_and_allocate(self, global_step: int, optimizer=None) -> None:
        """Update sensitivities and mask ranks; call once per optimizer step, after ``optimizer.step()``
        and before ``optimizer.zero_grad()``.  A missing gradient raises a ``RuntimeError`` naming the
        parameter.

        ``global_step`` is the 0-based index of the optimizer step just taken (0 on the first step),
        which is what ``transformers.Trainer`` passes as ``state.global_step`` in ``on_optimizer_step``
        and what PEFT's examples pass from their loop counter.  The last step of the run is
        ``total_step - 1``.  ``optimizer`` is needed (and only used) with ``compact_at_final=True``: at
        ``total_step - tfinal`` the masked triplets are dropped and its state sliced (``compact_ranks``).
        """
        try:
            step = operator.index(global_step)  # int, numpy int, 0-d integer tensor
        except TypeError:
            step = -1
        if isinstance(global_step, bool) or step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        if self.allocator is None:
            raise RuntimeError("update_and_allocate: " + ("the model was built with inference_mode=True (or loaded "
                               "with is_trainable=False): it has no rank allocator; load it with is_trainable=True "
                               "to train" if self._adapters else "the model has no adapters left (merge_and_unload "
                               "or unload was called)"))
        if self._active != self.adapter_name:
            raise RuntimeError(f"update_and_allocate: the active adapter is {self._active!r}, loaded for inference; "
                               f"set_adapter({self.adapter_name!r}) to train")
        config = self.adalora_config
        config.require_total_step()
        if config.compact_at_final and optimizer is None:
            raise ValueError("update_and_allocate: compact_at_final=True needs the optimizer, whose state is sliced when "
                             "the ranks are compacted: call update_and_allocate(step, optimizer=optimizer) (the "
                             "AdaLoraCallback passes the Trainer's)")
        self.allocator.update_and_allocate(step)
        if config.compact_at_final and step == config.total_step - config.tfinal:
            self.compact_ranks(optimizer)

    def set_total_step(self, total_step: int) -> None:
        """Set the schedule's length (``AdaLoraCallback`` does it from the Trainer's ``max_steps``).

        The schedule is validated first (``ValueError``, nothing changed, when it leaves no budgeting phase).
        """
        config = dataclasses.replace(self.adalora_config, total_step=total_step)  # validates
        self.adalora_config = config
        if self.allocator is not None:
            self.allocator.total_step = config.total_step

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<module path in .model>.lora_E": [kept?] * r}`` from the last mask, or None before any.

        One flag per triplet the layer holds now (``init_r``, or the rank it was resized to at load).

        The keys equal PEFT's saved ``rank_pattern`` keys (PEFT's live keys carry a trailing ``.default``).
        """
        return None if self.allocator is None else self.allocator.rank_pattern

    def export_config(self) -> AdaLoraConfig:
        """A copy of the config with ``rank_pattern`` filled in, for writing a checkpoint."""
        pattern = self.rank_pattern
        return dataclasses.replace(
            copy.deepcopy(self.adalora_config),
            rank_pattern=None if pattern is None else {k: list(v) for k, v in pattern.items()},
        )

    # ------------------------------------------------------------------ state
    def _frozen_base_keys(self, prefix: str = "") -> set[str]:
        """``state_dict`` keys of the base model's frozen parameters (not adapters, heads or trainable ones)."""
        keep = {id(p) for layer in self._adapters.values() for p in layer.adapter_params()}
        keep |= {id(p) for head in self._heads.values() for p in head.parameters()}
        return {f"{prefix}model.{name}" for name, p in self.model.named_parameters(remove_duplicate=False)
                if id(p) not in keep and not p.requires_grad}

    def _base_layer_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        """Key prefixes of the adapted layers' (frozen) base layers, whose extra state (a quantized
        weight's ``absmax``, ``quant_map``, ...) belongs to the base model too."""
        return tuple(f"{prefix}model.{path}.base_layer." for path in self._adapters)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The trainable state: adapters, ``modules_to_save`` heads, any other trainable parameter,
        the buffers, and the allocator state (``_extra_state``) — not the frozen base weights.

        It is all an exact resume needs, it is adapter-sized, and it saves with safetensors also for
        tied embeddings (as ``transformers.Trainer`` checkpoints do).  ``model.model.state_dict()``
        is the whole base model.  ``load_state_dict`` accepts this dict or a full one.
        """
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        frozen, bases = self._frozen_base_keys(prefix), self._base_layer_prefixes(prefix)
        trainable = {f"{prefix}model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        for key in [k for k in sd if k in frozen or (k.startswith(bases) and k not in trainable)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` where the frozen base weights may be absent (see ``state_dict``)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen, bases = self._frozen_base_keys(), self._base_layer_prefixes()
        missing = [k for k in result.missing_keys if k not in frozen and not k.startswith(bases)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")
        return type(result)(missing, result.unexpected_keys)

    def get_extra_state(self) -> torch.Tensor:
        """The allocator state, torch-serialised into a uint8 tensor (so state dicts stay tensor-only).

        The tensor's length depends only on the adapter layout (an 8-byte length, the payload, zero
        padding), so loaders that fill a tensor of the current size (torch.distributed.checkpoint) work.
        """
        state = None if self.allocator is None else self.allocator.state_dict()
        payload = _serialise({"format": _EXTRA_STATE_FORMAT, "version": 2, "allocator": state})
        capacity = self._extra_state_capacity(state)
        if len(payload) + 8 > capacity:  # pragma: no cover - the capacity is computed from the largest state
            capacity = len(payload) + 8
        blob = bytearray(capacity)
        blob[:8] = len(payload).to_bytes(8, "little")
        blob[8:8 + len(payload)] = payload
        return torch.frombuffer(blob, dtype=torch.uint8)

    def _extra_state_capacity(self, state) -> int:
        """The blob length for this layout: the serialised size of its largest state, plus a margin."""
        key = None if state is None else (tuple(state["names"]), tuple(state["ranks"]), state["ipt"].dtype,
                                          state["ipt"].numel())
        if "_capacity" not in self.__dict__ or self.__dict__["_capacity_key"] != key:  # key None: no allocator
            largest = None
            if state is not None:
                keep = torch.ones(sum(state["ranks"]), dtype=torch.bool)
                largest = {**state, "ipt": state["ipt"].cpu(), "unc": state["unc"].cpu(), "keep": keep,
                           "final_keep": keep, "init_bgt": 2**62, "last_step": 2**62}
            size = len(_serialise({"format": _EXTRA_STATE_FORMAT, "version": 2, "allocator": largest}))
            self.__dict__["_capacity_key"], self.__dict__["_capacity"] = key, size + 8 + 4096
        return self.__dict__["_capacity"]

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            device = next((layer.lora_A.device for layer in self._adapters.values()), torch.device("cpu"))
            data = state.cpu().numpy().tobytes()
            if data[:2] != b"PK":  # version 2: length-prefixed and padded (version 1 was the bare zip)
                data = data[8:8 + int.from_bytes(data[:8], "little")]
            state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _EXTRA_STATE_FORMAT:
            raise ValueError("Unrecognised extra state: not written by fastadalora.AdaLoraModel.get_extra_state.")
        if state["allocator"] is not None and self.allocator is not None:
            self.allocator.load_state_dict(state["allocator"])

    # ------------------------------------------------------------------ checkpoints
    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token=None, create_pr: bool = False, revision: str | None = None,
                    commit_description: str | None = None, selected_adapters=None):
        """``save_pretrained`` into a temporary folder, then upload it to the Hub repo ``repo_id`` (created if
        missing), as PEFT's ``push_to_hub``; the commit info is returned."""
        return checkpoint.push_to_hub(lambda d: self.save_pretrained(d, selected_adapters=selected_adapters),
                                      repo_id, commit_message=commit_message, commit_description=commit_description,
                                      private=private, token=token, revision=revision, create_pr=create_pr)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        is_main_process: bool = True, **kwargs) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT 0.21's format.

        As PEFT: the adapter named ``"default"`` goes into ``save_directory`` itself and any other into
        ``save_directory/<name>``; ``selected_adapters`` (default: all) picks which.  The live model
        and its config are not modified.  Only safetensors is written (``safe_serialization=False``
        raises), and nothing is written when ``is_main_process`` is False.  Under ``torch.distributed``
        only rank 0 writes; with FSDP2-sharded adapters it is a collective (every rank calls it and
        takes part in gathering the full adapter).
        """
        if not safe_serialization:
            raise ValueError("save_pretrained: fastadalora writes safetensors only (safe_serialization=False "
                             "would write a pickle, which from_pretrained refuses to load)")
        names = list(self.adapter_names())
        selected = names if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in selected if n not in names]
        if unknown:
            raise ValueError(f"save_pretrained: selected_adapters={selected!r}; this model's adapters are {names}")
        from . import distributed

        shared = (self.allocator is None or self.allocator.distributed_enabled) and distributed.active()
        writes = is_main_process and (not shared or distributed.write_rank())  # DDP/FSDP: rank 0 writes
        layers, heads = self.adapter_layers(), self.head_modules()
        sharded = shared and distributed.has_sharded(self, layers, heads)  # FSDP2: every rank gathers, rank 0 writes
        if not writes and not sharded:
            return
        with distributed.gathered_adapters(layers, heads, distributed.channel_of(self.allocator)) if sharded \
                else contextlib.nullcontext():
            for name in selected if writes else ():
                directory = save_directory if name == "default" else os.path.join(save_directory, name)
                if name == self.adapter_name:
                    self._write_adapter(directory)
                else:
                    self._write_inference_adapter(name, directory)

    def _write_adapter(self, directory) -> None:
        layers, heads, masks = self.adapter_layers(), self.head_modules(), self.live_masks()
        if any(targeting.layer_kind(layer.base_layer) == "embedding" for layer in layers.values()):
            warnings.warn("save_pretrained: this adapter has an Embedding layer; fastadalora loads it, PEFT's AdaLoRA "
                          "cannot (it has no AdaLoRA Embedding layer). save_lora() writes a LoRA adapter PEFT loads.")
        tensors = peft_format.adapter_tensors(layers, masks, heads)
        heads_keys = set(tensors)
        for name, p in _bias_params(self.model, layers, self.adalora_config.bias).items():
            key = f"{peft_format.PREFIX}{name}"
            if key not in heads_keys:
                tensors[key] = p.detach().to("cpu", copy=True).contiguous()
        config = peft_format.config_dict(self.adalora_config, self.model, layers, heads, masks)
        checkpoint.write_model_card(directory, lambda existing: peft_format.model_card(self.model, self.adalora_config,
                                                                                       existing=existing))
        checkpoint.write_checkpoint(directory, tensors, config)

    def _write_inference_adapter(self, name: str, directory) -> None:
        config, layers = self._inference_configs[name], {}
        for path, layer in self._adapters.items():
            extra = layer.inference_adapter(name)
            if extra is not None:
                layers[path] = extra
        tensors = peft_format.adapter_tensors(layers, {}, {})
        cfg = peft_format.config_dict(config, self.model, layers, {}, {})
        checkpoint.write_checkpoint(directory, tensors, cfg)

    @classmethod
    def from_pretrained(cls, model: nn.Module, pretrained_path, adapter_name: str = "default", is_trainable: bool = False,
                        config=None, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                        device_map=None, **kwargs) -> "AdaLoraModel":
        """Load an AdaLoRA adapter saved by PEFT 0.21 or by ``save_pretrained`` onto ``model``.

        Adapters are injected at ``init_r``, each resized to its saved rank (``ranknum`` stays
        ``init_r``, so the scale is PEFT's), and the weights copied in; weights of ``modules_to_save``
        are copied into the model's modules.  Everything is validated first (``checkpoint.plan_load``):
        on any error the model is left untouched.  ``is_trainable=False`` freezes the adapters and puts
        the model in eval mode; ``True`` leaves adapters and heads trainable (train/eval mode
        unchanged, as PEFT) and training continues with the budget computed from the loaded ranks.

        PEFT's keywords: ``config`` replaces the directory's config (an ``AdaLoraConfig`` or a
        ``peft.AdaLoraConfig``); ``device_map`` is one device (``"cpu"``, ``"cuda:0"``, ``torch.device``)
        or ``"auto"`` (the model's own device) to put the adapter on; ``low_cpu_mem_usage`` is accepted
        (the adapter is small and loaded in place either way).
        """
        if config is not None:
            config = AdaLoraConfig.of(config, "from_pretrained: config")
        device = _single_device(device_map, model)
        plan = checkpoint.plan_load(model, pretrained_path, (AdapterLayer,), config=config)
        plan.config = dataclasses.replace(plan.config, inference_mode=not is_trainable)  # PEFT's rule
        adalora = cls(model, plan.config, autocast_adapter_dtype=autocast_adapter_dtype, adapter_name=adapter_name)
        adalora._apply_checkpoint(plan)
        if device is not None:
            for layer in adalora._adapters.values():
                layer.to(device)
            if adalora.allocator is not None:
                adalora.allocator.refresh()
        if not is_trainable:
            adalora.requires_grad_(False)
            adalora.eval()
        return adalora

    # ------------------------------------------------------------------ several adapters (inference)
    def adapter_names(self) -> list[str]:
        """The trainable adapter's name, then those of the adapters loaded for inference."""
        return [self.adapter_name, *self._inference_configs]

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, **kwargs) -> None:
        """Load a further AdaLoRA adapter, for inference (PEFT's ``load_adapter``); ``set_adapter`` selects it.

        AdaLoRA trains one adapter per model: ``is_trainable=True`` is refused (build the model from
        that checkpoint with ``from_pretrained(..., is_trainable=True)`` instead).  The new adapter may
        adapt a subset of this model's adapted layers; the others run their base layer while it is active.
        """
        if is_trainable:
            raise ValueError("load_adapter: AdaLoRA trains one adapter per model; load a second one for inference "
                             "(is_trainable=False), or train it with AdaLoraModel.from_pretrained(..., is_trainable=True)")
        self._check_new_adapter_name("load_adapter", adapter_name)
        plan = checkpoint.plan_inference_adapter(self.adapter_layers(), model_id)
        cfg = plan.config
        scaling = peft_math.scaling_of(cfg.init_r, cfg.lora_alpha)
        for lp in plan.layers:
            layer = self._adapters[lp.path]
            A, E, B = layer.adapter_params()
            held = list(range(cfg.init_r)) if lp.keep is None else [i for i, k in enumerate(lp.keep) if k]
            tensors = [lp.tensors[n].to(device=A.device, dtype=A.dtype) for n in peft_format.LORA]
            layer.add_inference_adapter(adapter_name, InferenceAdapter(*tensors, scaling, cfg.init_r, cfg.init_r,
                                                                       held, layer.fan_in_fan_out))
        self._inference_configs[adapter_name] = cfg

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
        """A new, freshly initialised adapter for inference (PEFT's ``add_adapter``; ``set_adapter`` selects it).

        As PEFT's AdaLoRA: only one adapter trains, so the config must have ``inference_mode=True``, and
        only one adapter may train biases.  It may adapt a subset of this model's adapted layers.
        """
        peft_config = AdaLoraConfig.of(peft_config, "add_adapter: peft_config")
        self._check_new_adapter_name("add_adapter", adapter_name)
        if not peft_config.inference_mode:  # PEFT's words
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")
        if peft_config.bias != "none" or self.adalora_config.bias != "none":  # PEFT's words
            raise ValueError("AdaLoraModel supports only 1 adapter with bias. When using multiple adapters, set bias "
                             "to 'none' for all adapters.")
        config = copy.deepcopy(peft_config)
        targets = targeting.resolve_target_modules(self.model, config, adapted=self._adapters)
        heads = list(config.head_modules())
        paths = [p for p in self._adapters
                 if targeting.target_matches(targets, p, config.layers_to_transform, config.layers_pattern)
                 and not targeting.name_matches(config.exclude_modules, p) and not targeting.within(heads, p)]
        if not paths:
            raise ValueError(f"add_adapter: target_modules={config.target_modules!r} matches none of the layers this "
                             f"model adapts ({sorted(self._adapters)}); a further adapter adds AdaLoRA to those only")
        r, scaling = config.init_r, peft_math.scaling_of(config.init_r, config.lora_alpha)
        added = {}
        for path in paths:  # PEFT's update_layer, in its RNG order: randn A, E, B, ranknum, then the init
            layer = self._adapters[path]
            A0, _, B0 = layer.adapter_params()
            A, E, B = torch.randn(r, A0.shape[1]), torch.randn(r, 1), torch.randn(B0.shape[0], r)
            torch.randn(1)  # PEFT's ranknum draw (a fixed float here)
            if config.init_lora_weights:
                peft_math.init_adapter_(A, E, B)
            A, E, B = (t.to(device=A0.device, dtype=A0.dtype) for t in (A, E, B))
            added[path] = InferenceAdapter(A, E, B, scaling, r, r, list(range(r)), layer.fan_in_fan_out)
        for path, adapter in added.items():
            self._adapters[path].add_inference_adapter(adapter_name, adapter)
        self._inference_configs[adapter_name] = config

    def _check_new_adapter_name(self, what: str, adapter_name) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.adapter_names():
            raise ValueError(f"{what}: an adapter named {adapter_name!r} exists already ({self.adapter_names()})")

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one the model runs (the trainable adapter, or one ``load_adapter`` added)."""
        if adapter_name not in self.adapter_names():
            raise ValueError(f"set_adapter: no adapter {adapter_name!r}; this model has {self.adapter_names()}")
        for layer in self._adapters.values():
            layer.active_adapter = adapter_name
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter ``load_adapter`` added (the trainable one stays: ``unload()`` removes everything)."""
        if adapter_name == self.adapter_name:
            raise ValueError(f"delete_adapter: {adapter_name!r} is the trainable adapter; unload() removes all adapters")
        if adapter_name not in self._inference_configs:
            raise ValueError(f"delete_adapter: Adapter {adapter_name} does not exist (this model has "
                             f"{self.adapter_names()})")
        for layer in self._adapters.values():
            layer.delete_inference_adapter(adapter_name)
        del self._inference_configs[adapter_name]
        if self._active == adapter_name:
            self._active = self.adapter_name

    def _apply_checkpoint(self, plan) -> None:
        """Resize and fill the adapters and heads from a validated ``CheckpointPlan``."""
        with torch.no_grad():
            for lp in plan.layers:
                layer = self._adapters[lp.path]
                if lp.keep is not None and not all(lp.keep):
                    layer.resize_rank(lp.keep)
                layer.load_adapter_(*(lp.tensors[name] for name in peft_format.LORA))
            for (owner, name), t in plan.head_tensors.items():
                self._heads[owner].state_dict(keep_vars=True)[name].copy_(t)
            biases = dict(self.model.named_parameters())
            for name, t in plan.bias_tensors.items():
                biases[name].copy_(t)
        if self.allocator is not None:
            self.allocator.refresh()

    # ------------------------------------------------------------------ beyond PEFT: compaction, LoRA export
    def compact_ranks(self, optimizer=None) -> int:
        """Drop every masked triplet from its layer for good; returns how many were dropped.

        FLOPs, memory and optimizer state then follow the kept ranks (PEFT only masks them).  Outputs are
        unchanged at the moment of compaction, ``ranknum`` keeps its value (so the scale is the same),
        and the allocator, the orthogonal term, merging and checkpoints keep working.  With
        ``optimizer`` its per-parameter state (Adam/AdamW moments and step, SGD momentum) is sliced
        along, so training continues without rebuilding it; state it cannot slice raises a
        ``ValueError`` before anything changes.  In the final phase (after ``total_step - tfinal``) the
        fixed pattern keeps every remaining triplet; compacting earlier makes the pruning permanent and
        restarts the sensitivity statistics.
        """
        from .export import compact_layers

        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise NotImplementedError("compact_ranks under torch.distributed: DDP's gradient buckets and FSDP's shards "
                                      "are built for the parameters' shapes; compact in one process (e.g. after "
                                      "training, before export) or keep the masked ranks")
        masks = self.live_masks()
        final = self.allocator is not None and self.allocator.final_pattern_fixed
        dropped = compact_layers(self.adapter_layers(), masks, optimizer)
        if dropped and self.allocator is not None:
            self.allocator.refresh()
            if final:
                self.allocator.set_rank_pattern({f"{p}.lora_E": [True] * layer.r for p, layer in self._adapters.items()})
        return dropped

    def save_lora(self, save_directory, uniform_rank: bool = False) -> None:
        """Write the adapter as a standard PEFT **LoRA** adapter (``LoraConfig`` + ``adapter_model.safetensors``).

        ``diag(E)·scale`` is folded into the factors and masked triplets are dropped; per-module ranks go
        in ``rank_pattern``/``alpha_pattern``, or with ``uniform_rank=True`` every module is zero-padded to
        the largest kept rank.  ``peft.PeftModel.from_pretrained`` (and LoRA serving engines) load it.
        """
        from .export import lora_checkpoint

        tensors, config = lora_checkpoint(self.adalora_config, self.model, self.adapter_layers(), self.live_masks(),
                                          self.head_modules(), uniform_rank=uniform_rank)
        checkpoint.write_checkpoint(save_directory, tensors, config)

    # ------------------------------------------------------------------ adapter switches (PEFT's API)
    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model (merged layers are unmerged first, as PEFT);
        on exit each layer is as it was (adapters disabled by ``disable_adapter_layers`` stay disabled)."""
        flags = {path: layer.disable_adapters for path, layer in self._adapters.items()}
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for path, layer in self._adapters.items():
                layer.disable_adapters = flags[path]

    def disable_adapter_layers(self) -> None:
        """Run the base layers alone until ``enable_adapter_layers()`` (PEFT's tuner method)."""
        if self.adalora_config.bias != "none":
            warnings.warn("Careful, disabling adapter layers with bias configured to be "
                          f"'{self.adalora_config.bias}' does not produce the same output as the base model would "
                          "without adaption.")
        for layer in self._adapters.values():
            layer.disable_adapters = True

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``."""
        for layer in self._adapters.values():
            layer.disable_adapters = False

    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Fold every adapter into its base weight (the layers stay; ``unmerge_adapter`` undoes it).

        With ``safe_merge`` every merged weight is checked first and nothing changes if one is not finite.
        """
        layers = [layer for layer in self._adapters.values() if not layer.merged]
        if self._adapters and not layers:
            warnings.warn("All adapters are already merged, nothing to do.")  # PEFT's words
        for layer in layers:  # a kind that cannot merge (a 4-bit base) refuses before any layer changes
            layer.check_can_merge()
        if safe_merge:
            self._check_mergeable(layers)
        for layer in layers:
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of its base weight."""
        for layer in self._adapters.values():
            if layer.merged:
                layer.unmerge()

    def _check_mergeable(self, layers) -> None:
        for layer in layers:
            if not bool(torch.isfinite(layer.merged_weight()).all()):
                raise ValueError(f"safe_merge: merging {layer.where} would give NaN/inf weights; no layer was changed")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names=None) -> nn.Module:
        """Fold every adapter into its base weight, put the base layers back and return the plain model.

        ``safe_merge=True`` is all or nothing: every merged weight is checked before any is written.
        """
        if adapter_names not in (None, [self.adapter_name]):
            raise ValueError(f"merge_and_unload: adapter_names={adapter_names!r}; this model's trainable adapter is "
                             f"{self.adapter_name!r}")
        self.merge_adapter(safe_merge=safe_merge)
        return self._remove_adapter_layers()

    def unload(self) -> nn.Module:
        """The base model back, without the adapters (merged ones are unmerged first)."""
        self.unmerge_adapter()
        return self._remove_adapter_layers()

    def _remove_adapter_layers(self) -> nn.Module:
        for path, layer in self._adapters.items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.base_layer)
        self._adapters = {}
        self.allocator = None
        return self.model

    # ------------------------------------------------------------------ PEFT's bookkeeping API
    @property
    def peft_config(self) -> dict[str, AdaLoraConfig]:
        """``{adapter name: config}`` (PEFT's ``PeftModel.peft_config``)."""
        return {self.adapter_name: self.adalora_config, **self._inference_configs}

    @property
    def active_adapter(self) -> str:
        return self._active

    @property
    def peft_type(self) -> PeftType:
        """``PeftType.ADALORA`` (PEFT's ``PeftModel.peft_type``; a str enum equal to ``"ADALORA"``)."""
        return PeftType.ADALORA

    @property
    def modules_to_save(self) -> set[str] | None:
        """The names of the modules trained in full, as PEFT's ``PeftModel.modules_to_save``: the config's
        ``modules_to_save`` plus the task type's heads, or None when there are none."""
        return set(self.adalora_config.head_modules()) or None

    @property
    def active_adapters(self) -> list[str]:
        return [self._active]

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module | None = None) -> nn.Module:
        """PEFT's: make the input embeddings' output require grad, so reentrant checkpointing reaches the adapters."""
        model = self.model if model is None else model
        if not any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT counts them for the same model.

        PEFT's model also holds one ``ranknum`` scalar per adapted layer and, for every
        ``modules_to_save`` head, a frozen copy of the original next to the trained one: both are counted.
        """
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte (PEFT's rule)
                n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
            total += n
            trainable += n if p.requires_grad else 0
        total += len(self._adapters)  # PEFT's ranknum Parameters
        total += sum(p.numel() for head in self._heads.values() for p in head.parameters())  # the original copies
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


def get_adalora_model(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default", mixed: bool = False,
                      autocast_adapter_dtype: bool = True, revision: str | None = None,
                      low_cpu_mem_usage: bool = False) -> AdaLoraModel:
    """Adapt ``model`` in place and return the ``AdaLoraModel`` that wraps it (PEFT's ``get_peft_model``,
    same signature).

    ``adapter_name`` names the (one, trainable) adapter, as in PEFT.  ``autocast_adapter_dtype=True``
    (PEFT's default) makes the adapters fp32 on a bf16/fp16 base; ``False`` keeps the base dtype.
    fp32 and fp64 bases are unchanged either way.  As PEFT, the config records the base model's
    ``name_or_path`` and ``revision``; ``mixed`` (PEFT's mixed-adapter model) is not supported and
    ``low_cpu_mem_usage`` changes nothing here (adapters are created in place either way).
    """
    if mixed:
        raise ValueError("get_adalora_model: mixed=True (PEFT's PeftMixedModel) is not supported by fastadalora")
    config = AdaLoraConfig.of(config)
    old, new = config.base_model_name_or_path, model.__dict__.get("name_or_path", None) or None
    if old is not None and old != new:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old}' to '{new}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.")
    changes = {"base_model_name_or_path": new}
    if revision is not None:
        if config.revision is not None and config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {config.revision}, overwriting "
                          f"with revision {revision}")
        changes["revision"] = revision
    config = dataclasses.replace(config, **changes)
    return AdaLoraModel(model, config, autocast_adapter_dtype=autocast_adapter_dtype, adapter_name=adapter_name)


def _bias_params(model: nn.Module, layers: dict, bias: str) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the biases PEFT's ``bias`` setting trains and saves: ``"all"`` every
    ``bias`` of the model, ``"lora_only"`` (any ``"<method>_only"``, as PEFT) those of the adapted layers,
    ``"none"`` none."""
    if bias == "all":
        return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}
    if bias.endswith("_only"):
        adapted = {f"{path}.base_layer.bias" for path in layers}
        return {n: p for n, p in model.named_parameters() if n in adapted}
    return {}


def _serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _single_device(device_map, model: nn.Module) -> torch.device | None:
    """``from_pretrained``'s ``device_map``: None, one device, or ``"auto"`` (the model's own device)."""
    if device_map is None:
        return None
    if device_map == "auto":
        first = next(model.parameters(), None)
        return None if first is None else first.device
    if isinstance(device_map, dict) and list(device_map) == [""]:  # the whole model on one device
        device_map = device_map[""]
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device(device_map)
    raise ValueError(f"device_map={device_map!r}: fastadalora puts an adapter on one device (a device string or "
                     "torch.device, or 'auto' for the model's own); a per-module map is not supported")


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a base layer computes in (a quantized layer's compute dtype, not its storage dtype)."""
    compute = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit
    return compute if isinstance(compute, torch.dtype) else module.weight.dtype


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's rule: fp32 adapters on a half-precision base when ``autocast_adapter_dtype``, else the base dtype."""
    if not base_dtype.is_floating_point:
        return torch.float32
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


# --------------------------------------------------------------------------- PEFT's state-dict functions
def _unwrap(model) -> AdaLoraModel:
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    if not isinstance(inner, AdaLoraModel):
        raise TypeError(f"expected a fastadalora.AdaLoraModel, got {type(model).__name__}")
    return inner


def _check_adapter_name(model: AdaLoraModel, adapter_name: str) -> None:
    if adapter_name != model.adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r}: this model's adapter is named {model.adapter_name!r}")


def get_peft_model_state_dict(model, state_dict=None, adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict``: the tensors ``save_pretrained`` writes (PEFT's keys, sliced
    to the kept ranks), as fresh CPU tensors.  ``state_dict`` and the embedding options are accepted for
    PEFT's signature and not needed here."""
    model = _unwrap(model)
    _check_adapter_name(model, adapter_name)
    return peft_format.adapter_tensors(model.adapter_layers(), model.live_masks(), model.head_modules())


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def set_peft_model_state_dict(model, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """PEFT's ``set_peft_model_state_dict``: load tensors keyed as ``get_peft_model_state_dict`` gives them.

    A layer whose tensors hold fewer triplets than the layer is resized to its live rank pattern
    (the kept triplets), as PEFT resizes by ``rank_pattern``.  Everything is checked first; on a
    mismatch a ``CheckpointError`` names the key and nothing is changed.
    """
    model = _unwrap(model)
    _check_adapter_name(model, adapter_name)
    lora, other = peft_format.split_keys(peft_model_state_dict, "peft_model_state_dict")
    layers, masks, heads = model.adapter_layers(), model.live_masks(), model.head_modules()
    unknown = sorted(set(lora) - set(layers))
    if unknown:
        raise checkpoint.CheckpointError(f"set_peft_model_state_dict: no adapter at {unknown}")
    resize: dict[str, list[bool]] = {}
    for path, parts in lora.items():
        layer = layers[path]
        r = parts["lora_A"].shape[0] if "lora_A" in parts else -1
        if r != layer.r:
            mask = masks.get(path)
            if mask is None or sum(mask) != r:
                raise checkpoint.CheckpointError(
                    f"set_peft_model_state_dict: {peft_format.PREFIX}{path}.lora_A holds {r} triplets; the layer holds "
                    f"{layer.r} and its rank pattern keeps {None if mask is None else sum(mask)}")
            resize[path] = mask
        expect = {"lora_A": (r, layer.in_features), "lora_E": (r, 1), "lora_B": (layer.out_features, r)}
        for name, shape in expect.items():
            t = parts.get(name)
            if t is None or tuple(t.shape) != shape:
                raise checkpoint.CheckpointError(
                    f"set_peft_model_state_dict: {peft_format.PREFIX}{path}.{name} has shape "
                    f"{None if t is None else tuple(t.shape)}, expected {shape}")
    head_tensors = {}
    for rel, t in other.items():
        owner = next((p for p in heads if rel.startswith(p + ".")), None)
        sd = heads[owner].state_dict() if owner else {}
        name = rel[len(owner) + 1:] if owner else rel
        if owner is None or name not in sd or tuple(sd[name].shape) != tuple(t.shape):
            raise checkpoint.CheckpointError(f"set_peft_model_state_dict: unexpected or mis-shaped key "
                                             f"{peft_format.PREFIX}{rel}")
        head_tensors[(owner, name)] = t
    with torch.no_grad():  # everything checked: apply
        for path, parts in lora.items():
            if path in resize:
                layers[path].resize_rank(resize[path])
            layers[path].load_adapter_(*(parts[name] for name in peft_format.LORA))
        for (owner, name), t in head_tensors.items():
            heads[owner].state_dict(keep_vars=True)[name].copy_(t)
    if resize:
        model.allocator.refresh()
    missing = [f"{peft_format.PREFIX}{p}.{n}" for p in layers if p not in lora for n in peft_format.LORA]
    return IncompatibleKeys(missing, [])


get_peft_model = get_adalora_model  # PEFT's name, for an import swap: `from fastadalora import get_peft_model`
