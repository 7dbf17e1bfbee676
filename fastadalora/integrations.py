"""``AdaLoraCallback``: drives ``AdaLoraModel.update_and_allocate`` from a ``transformers.Trainer``.

``transformers`` is imported only when this module is, and ``fastadalora`` imports this module
only when ``fastadalora.AdaLoraCallback`` is first accessed.

Step numbering.  ``Trainer`` calls ``on_optimizer_step`` right after ``optimizer.step()`` and
before ``model.zero_grad()`` and before it increments ``state.global_step``; so the callback
passes 0 on the first optimizer step, 1 on the second, ... -- the same 0-based index a manual
loop ``for step, batch in enumerate(loader): ...; model.update_and_allocate(step)`` passes.
Set ``AdaLoraConfig.total_step`` to the Trainer's number of optimizer steps (``max_steps``, or
epochs × batches / gradient_accumulation_steps).
"""

from __future__ import annotations

from transformers import TrainerCallback


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
    """Calls ``model.update_and_allocate(state.global_step)`` after every optimizer step.

    Example::

        model = fastadalora.get_adalora_model(base, fastadalora.AdaLoraConfig(total_step=1000, ...))
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[fastadalora.AdaLoraCallback()])

    Pass ``model`` to target a specific ``AdaLoraModel``; by default the model the Trainer trains is used.
    """

    def __init__(self, model=None) -> None:
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = _find_adalora_model(self.model if self.model is not None else kwargs.get("model"))
        if model is None:
            raise TypeError(
                "AdaLoraCallback: the Trainer's model is not a fastadalora.AdaLoraModel; build it with "
                "fastadalora.get_adalora_model(...) or pass AdaLoraCallback(model=...)."
            )
        model.update_and_allocate(state.global_step)
        return control
