"""A tiny ``transformers.Trainer`` job with ``AdaLoraCallback`` for ``torchrun`` / ``accelerate launch`` smoke runs.

    torchrun --nproc_per_node 2 dist_trainer.py --out DIR                             # DDP
    accelerate launch --multi_gpu --num_processes 2 dist_trainer.py --fsdp --out DIR  # FSDP2
    torchrun --nproc_per_node 2 dist_trainer.py --deepspeed --out DIR                 # ZeRO-2: a clear error

Trains 8 optimizer steps (checkpoints at 4 and 8), then a fresh model and Trainer resume from
``checkpoint-4`` and train to 8.  Rank 0 writes ``DIR/result.json``: whether the resumed run ended
with the same rank pattern, adapter weights and allocator state as the straight one, and what the
straight run's checkpoint holds.  (On CPU, ``accelerate launch --cpu`` starts one process unless
MPI is set up, so the multi-process launch is ``--multi_gpu`` with ``use_cpu=True``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastadalora  # noqa: E402
from support import cls_batch, tiny_bert  # noqa: E402

STEPS = 8


class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        batch = cls_batch(batch=n, seed=1)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def model():
    cfg = fastadalora.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, lora_alpha=8,
                                    target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    return fastadalora.get_adalora_model(tiny_bert(seed=0), cfg)  # total_step: the callback sets it from max_steps


def trainer(m, out, fsdp: str):
    import transformers

    extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"],
                                         "state_dict_type": "FULL_STATE_DICT"}) if fsdp == "fsdp" else {}
    if fsdp == "deepspeed":  # ZeRO-2: the allocator must refuse it clearly (the gradients are out of reach)
        extra = dict(deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
                                "fp16": {"enabled": False}})
    args = transformers.TrainingArguments(**extra,
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=0.02, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=4, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=7)
    if fsdp == "fsdp":
        force_fsdp_on_cpu()
    return transformers.Trainer(model=m, args=args, train_dataset=Rows(64), callbacks=[fastadalora.AdaLoraCallback()])


def force_fsdp_on_cpu() -> None:
    """accelerate enables FSDP only for GPU-like device types (on CPU it silently trains with DDP); the
    smoke test turns its FSDP2 path on for gloo/CPU by hand, each time the Trainer makes its Accelerator."""
    import transformers
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    make = transformers.Trainer.create_accelerator_and_postprocess
    if getattr(make, "forced_fsdp", False):
        return

    def create_accelerator_and_postprocess(self):
        make(self)
        state = self.accelerator.state
        if getattr(state, "fsdp_plugin", None) is None:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() re-reads it
            self.is_fsdp_enabled = True

    create_accelerator_and_postprocess.forced_fsdp = True
    transformers.Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess


def state(t) -> dict:
    """Full adapter/head tensors and the allocator state (every rank: collectives under FSDP)."""
    from fastadalora.distributed import is_dtensor

    ada = fastadalora.integrations._find_adalora_model(t.model_wrapped) or fastadalora.integrations._find_adalora_model(
        t.model)
    tensors = {n: (p.detach().full_tensor() if is_dtensor(p) else p.detach()).clone()
               for n, p in ada.named_parameters() if p.requires_grad}
    sharded = any(is_dtensor(p) for p in ada.parameters())
    return {"tensors": tensors, "allocator": ada.allocator.state_dict(), "pattern": ada.rank_pattern,
            "sharded": sharded, "wrapper": type(t.model_wrapped).__name__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fsdp", dest="engine", action="store_const", const="fsdp", default="ddp",
                    help="FSDP2 through TrainingArguments(fsdp=..., fsdp_config=...)")
    ap.add_argument("--deepspeed", dest="engine", action="store_const", const="deepspeed", help="DeepSpeed ZeRO-2")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    straight = trainer(model(), os.path.join(args.out, "straight"), args.engine)
    if args.engine == "deepspeed":
        try:
            straight.train()
        except RuntimeError as exc:
            if int(os.environ.get("RANK", "0")) == 0:
                with open(os.path.join(args.out, "result.json"), "w") as f:
                    json.dump({"error": str(exc), "wrapper": type(straight.model_wrapped).__name__}, f)
            return
    straight.train()
    a = state(straight)
    resumed = trainer(model(), os.path.join(args.out, "resumed"), args.engine)
    resumed.train(resume_from_checkpoint=os.path.join(args.out, "straight", "checkpoint-4"))
    b = state(resumed)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        same_tensors = a["tensors"].keys() == b["tensors"].keys() and all(
            torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
        same_alloc = all(torch.equal(v, b["allocator"][k]) if isinstance(v, torch.Tensor) else v == b["allocator"][k]
                         for k, v in a["allocator"].items())
        ckpt = os.path.join(args.out, "straight", "checkpoint-4")
        result = {"world": int(os.environ.get("WORLD_SIZE", "1")), "sharded": a["sharded"], "wrapper": a["wrapper"],
                  "same_tensors": same_tensors,
                  "same_allocator": same_alloc, "same_pattern": a["pattern"] == b["pattern"],
                  "pruned": a["pattern"] is not None and sum(map(sum, a["pattern"].values())) < 4 * len(a["pattern"]),
                  "last_step": a["allocator"]["last_step"], "checkpoint_files": sorted(os.listdir(ckpt))}
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
