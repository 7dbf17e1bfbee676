"""Adapter checkpoints in PEFT 0.21's on-disk format: ``adapter_model.safetensors`` + ``adapter_config.json``.

* ``peft_format``: the keys, the slicing by rank pattern and the config dict (PEFT's layout);
* ``files``: reading and writing the directory (safetensors and JSON only, atomic writes);
* ``load``: validate a checkpoint against a base model, then hand back a plan to apply.

``AdaLoraModel.save_pretrained`` / ``AdaLoraModel.from_pretrained`` are the entry points; this
package never imports the model.
"""

from .files import (push_to_hub, read_adapter_config, read_adapter_weights, read_checkpoint, write_checkpoint,
                    write_model_card)
from .load import CheckpointPlan, LayerPlan, plan_inference_adapter, plan_load
from .peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, CheckpointError, CheckpointNotFoundError

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "CheckpointError", "CheckpointNotFoundError", "CheckpointPlan",
           "LayerPlan", "plan_inference_adapter", "plan_load",
           "push_to_hub", "read_adapter_config", "read_adapter_weights", "read_checkpoint", "write_checkpoint",
           "write_model_card"]
