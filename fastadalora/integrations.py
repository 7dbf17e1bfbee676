"""``AdaLoraCallback``: drives an ``AdaLoraModel`` from a ``transformers.Trainer``.

``transformers`` is imported only when this module is, and ``fastadalora`` imports this module
only when ``fastadalora.AdaLoraCallback`` is first accessed.

Step numbering.  ``Trainer`` calls ``on_optimizer_step`` right after ``optimizer.step()``, before
``model.zero_grad()`` and before it increments ``state.global_step``; so the callback passes 0 on
the first optimizer step, 1 on the second, ... -- the same 0-based index a manual loop
``for step, batch in enumerate(loader): ...; model.update_and_allocate(step)`` passes.
"""

from __future__ import annotations

import os
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def _find_adalora_model(model):
    from .model import AdaLoraModel

    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, AdaLoraModel):
            return model
        # unwrap DDP / accelerate / torch.compile wrappers
        inner = getattr(model, "module", None)
        model = inner if inner is not None else getattr(model, "_orig_mod", None)
    return None


class AdaLoraCallback(TrainerCallback):
    """Rank allocation and PEFT-format checkpoints for a ``transformers.Trainer`` run.

    * at train start, fills ``total_step`` from the Trainer's ``max_steps`` when the config left it
      None (and warns when a set value differs);
    * after every optimizer step, calls ``model.update_and_allocate(state.global_step)``, except
      on a step the optimizer skipped (an fp16 ``GradScaler`` overflow);
    * at every checkpoint, writes the adapter in PEFT's format (``adapter_model.safetensors``,
      ``adapter_config.json``) into the checkpoint folder, beside the Trainer's ``model.safetensors``
      (which holds ``AdaLoraModel.state_dict()``: the trainable state and the allocator's, what
      ``resume_from_checkpoint`` reloads);
    * at train end, warns when the ranks never changed.

    Example::

        model = fastadalora.get_adalora_model(base, fastadalora.AdaLoraConfig(target_modules=[...]))
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[fastadalora.AdaLoraCallback()])

    Pass ``model`` to target a specific ``AdaLoraModel``; by default the model the Trainer trains is used.
    """

    def __init__(self, model=None) -> None:
        self.model = model

    def _adalora(self, kwargs):
        model = _find_adalora_model(self.model if self.model is not None else kwargs.get("model"))
        if model is None:
            raise TypeError(
                "AdaLoraCallback: the Trainer's model is not a fastadalora.AdaLoraModel; build it with "
                "fastadalora.get_adalora_model(...) or pass AdaLoraCallback(model=...)."
            )
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        model = self._adalora(kwargs)
        total = model.adalora_config.total_step
        if total is None:
            model.set_total_step(state.max_steps)
        elif total != state.max_steps:
            warnings.warn(f"AdaLoraCallback: AdaLoraConfig.total_step={total} but the Trainer runs max_steps="
                          f"{state.max_steps} optimizer steps; the rank schedule follows total_step.")
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self._adalora(kwargs)
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            return control  # accelerate's optimizer: the GradScaler skipped this step, so does the allocator
        model.update_and_allocate(state.global_step, optimizer=kwargs.get("optimizer"))
        return control

    def on_save(self, args, state, control, **kwargs):
        # every rank: with FSDP-sharded adapters save_pretrained gathers them (a collective); rank 0 writes
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._adalora(kwargs).save_pretrained(folder, is_main_process=state.is_world_process_zero)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        model = self._adalora(kwargs)
        pattern = model.rank_pattern
        if pattern is None or all(all(flags) for flags in pattern.values()):
            cfg = model.adalora_config
            warnings.warn(
                f"AdaLoraCallback: the ranks never changed in this run ({state.global_step} optimizer steps; the "
                f"schedule masks after tinit={cfg.tinit}, every deltaT={cfg.deltaT}, down to target_r={cfg.target_r} "
                f"by total_step - tfinal={cfg.total_step - cfg.tfinal if cfg.total_step else None}).")
        return control
