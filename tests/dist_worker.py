"""One rank of a ``torch.distributed`` (gloo, CPU) run for ``test_distributed.py``; also the single-process twin.

    python dist_worker.py --rank R --world W --port P --out DIR SCENARIO [SCENARIO ...]

Every scenario trains a tiny float64 model through AdaLoRA's whole schedule (budgeting phase, the
forced final mask, the fixed phase) with the orthogonal term, on global batches of ``2·B`` rows of
which rank k takes rows ``[k·B, (k+1)·B)``.  ``run(...)`` with ``mode="single"`` is the one-process
twin on the whole batch (the test calls it in its own process).  Each rank writes what it saw to
``DIR/<scenario>-rank<R>.pt``; a scenario that raises writes the error text instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastadalora  # noqa: E402
from fastadalora import distributed as fastadalora_distributed  # noqa: E402
from support import cls_batch, lm_batch, tiny_bert, tiny_gpt2_lm  # noqa: E402

TOTAL_STEP = 16
CONFIG = dict(init_r=3, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=TOTAL_STEP, lora_alpha=8,
              lora_dropout=0.0, orth_reg_weight=0.5)  # init_r=3 over 2 ranks: uneven shards of A and E (2 + 1)
MID_STEP = TOTAL_STEP - CONFIG["tfinal"] - 1
PER_RANK = 2
LR = 1e-2


def causal_lm_loss(logits, labels, vocab_size, **kwargs):
    """transformers' causal-LM loss in the logits' dtype (its own casts the logits to fp32)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1))


def build(kind: str, **overrides):
    if kind == "bert":  # "dense" also matches the pooler: an adapter outside the blocks (in the root's FSDP group)
        base = tiny_bert(seed=0, dtype=torch.float64)
        cfg = dict(CONFIG, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    else:
        base = tiny_gpt2_lm(seed=0, dtype=torch.float64)
        base.loss_function = causal_lm_loss
        cfg = dict(CONFIG, target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
    return fastadalora.get_adalora_model(base, fastadalora.AdaLoraConfig(**dict(cfg, **overrides)))


def blocks(model):
    inner = model.model
    return list(inner.bert.encoder.layer) if hasattr(inner, "bert") else list(inner.transformer.h)


def global_batch(kind: str, step: int, world: int) -> dict:
    make = cls_batch if kind == "bert" else lm_batch
    return make(batch=PER_RANK * world, seed=100 + step)


def shard_of(batch: dict, rank: int, world: int, mode: str) -> dict:
    if mode == "single":
        return batch
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def eval_batch(kind: str) -> dict:
    make = cls_batch if kind == "bert" else lm_batch
    return make(batch=3, seed=999)


def flat_pattern(model):
    pattern = model.rank_pattern
    return None if pattern is None else [f for k in sorted(pattern) for f in pattern[k]]


def full_trainable(model) -> dict:
    from fastadalora.distributed import is_dtensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if is_dtensor(t) else t).clone()
    return out


def wrap(model, mode: str):
    """``(module to call, AdaLoraModel)``: DDP over the AdaLoraModel or over its .model, FSDP2, or HSDP
    (``hsdp-RxS``: FSDP2 on a 2-D mesh, R replicas of S shards, ``(Replicate(), Shard(0))`` placements)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if mode == "ddp":
        return DDP(model), model
    if mode == "ddp-inner":
        return DDP(model.model), model
    if mode == "fsdp" or mode.startswith("hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if mode == "fsdp":
            mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        else:
            replicas, shards = map(int, mode.split("-")[1].split("x"))
            mesh = init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if mode.startswith("hsdp"):
            from torch.distributed.tensor import Replicate, Shard

            placements = {tuple(p.placements) for p in model.parameters() if p.requires_grad}
            assert placements == {(Replicate(), Shard(0))}, placements
        return model, model
    return model, model


def full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model, optimizer, ckpt) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt["optim"], options=opts)


def run(kind: str, mode: str, rank: int = 0, world: int = 2, start: int = 0, stop: int = TOTAL_STEP,
        save_at=(), ckpt_dir=None, resume=None, save_adapter=None) -> dict:
    """Train steps ``[start, stop)``; returns per-step losses and patterns and the final state."""
    torch.manual_seed(0)
    model = build(kind)
    model.train()
    module, ada = wrap(model, mode)
    optimizer = torch.optim.AdamW([p for p in ada.parameters() if p.requires_grad], lr=LR)
    if resume is not None:
        ckpt = torch.load(resume, weights_only=True)
        assert ckpt["step"] == start
        load_full_state(ada, optimizer, ckpt)
    losses, patterns, mid = [], [], None
    for step in range(start, stop):
        if step in save_at:
            msd, osd = full_state(ada, optimizer)
            if rank == 0:
                torch.save({"step": step, "model": msd, "optim": osd}, os.path.join(ckpt_dir, f"{kind}-step{step}.pt"))
        batch = shard_of(global_batch(kind, step, world), rank, world, mode)
        loss = module(**batch).loss
        if mode == "ddp-inner":  # DDP over .model: the orthogonal term is added by hand, in the same backward
            loss = loss + ada.adalora_config.orth_reg_weight * ada.orth_reg_loss()
        loss.backward()
        optimizer.step()
        ada.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        patterns.append(flat_pattern(ada))
        if step == MID_STEP:  # the EMAs just before the final mask (which resets them)
            mid = ada.allocator.state_dict()
    allocator = ada.allocator.state_dict()  # a collective under FSDP2: every rank
    ada.eval()
    with torch.no_grad():
        logits = module(**eval_batch(kind)).logits.detach().clone()
    if save_adapter is not None:
        ada.save_pretrained(save_adapter)  # a collective under FSDP2: every rank, rank 0 writes
    return {"losses": losses, "patterns": patterns, "trainable": full_trainable(ada), "allocator": allocator,
            "mid_allocator": mid, "logits": logits}


# --------------------------------------------------------------------------- scenarios
def scenario(name: str, rank: int, world: int, out: str) -> dict:
    kind = "gpt2" if "gpt2" in name else "bert"
    if name in ("ddp-bert", "ddp-gpt2"):
        return run(kind, "ddp", rank, world)
    if name in ("ddp-inner-bert", "ddp-inner-gpt2"):
        return run(kind, "ddp-inner", rank, world)
    if name in ("fsdp-bert", "fsdp-gpt2"):
        return run(kind, "fsdp", rank, world, save_at=(7, 13), ckpt_dir=out,
                   save_adapter=os.path.join(out, f"adapter-{name}"))
    if name.startswith("hsdp-"):  # hsdp-1x2-bert: the shard dimension is the mesh's second
        mode = name.rsplit("-", 1)[0]
        return run(kind, mode, rank, world, save_adapter=os.path.join(out, f"adapter-{name}"))
    if name.startswith("fsdp-resume"):  # fsdp-resume-bert-7
        at = int(name.rsplit("-", 1)[1])
        return run(kind, "fsdp", rank, world, start=at, resume=os.path.join(out, f"{kind}-step{at}.pt"))
    if name == "mismatch":  # rank 1 adapts one module kind fewer: no DDP/FSDP, which would refuse it themselves
        model = build("bert", target_modules=["query", "value"] if rank else ["query", "key", "value"])
        model.train()
        model(**cls_batch(batch=2, seed=rank)).loss.backward()
        model.update_and_allocate(0)
        return {}
    if name == "diverge":  # rank 1 perturbs a gradient after DDP's all-reduce (as a no_sync micro-batch would)
        model = build("bert")
        module, ada = wrap(model, "ddp")
        ada.train()
        optimizer = torch.optim.SGD([p for p in ada.parameters() if p.requires_grad], lr=LR)
        for step in range(2 * CONFIG["deltaT"] + CONFIG["tinit"]):
            module(**shard_of(global_batch("bert", step, world), rank, world, "ddp")).loss.backward()
            optimizer.step()
            if rank == 1:
                next(iter(ada.adapter_layers().values())).lora_B.grad.mul_(3.0)
            ada.update_and_allocate(step)
            optimizer.zero_grad()
        return {}
    if name == "one-rank-fsdp":  # sharded: a collective every step; at step 1 only rank 0 allocates
        model = build("bert")
        fastadalora_distributed.configure(model, timeout=timedelta(seconds=3))
        module, ada = wrap(model, "fsdp")
        ada.train()
        for step in range(2):
            module(**shard_of(global_batch("bert", step, world), rank, world, "fsdp")).loss.backward()
            if rank == 0 or step == 0:
                ada.update_and_allocate(step)
            ada.zero_grad()
        return {}
    if name == "one-rank":  # only rank 0 allocates: it must fail with a clear error, not hang
        model = build("bert")
        fastadalora_distributed.configure(model, timeout=timedelta(seconds=3))
        module, ada = wrap(model, "ddp")
        ada.train()
        module(**cls_batch(batch=2, seed=rank)).loss.backward()
        if rank == 0:
            ada.update_and_allocate(0)
        return {}
    raise ValueError(f"unknown scenario {name!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("scenarios", nargs="+")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                         world_size=args.world, timeout=timedelta(seconds=120))
    try:
        for name in args.scenarios:
            try:
                result = scenario(name, args.rank, args.world, args.out)
            except Exception as exc:  # noqa: BLE001 - the test reads and checks the error
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            torch.save(result, os.path.join(args.out, f"{name}-rank{args.rank}.pt"))
    finally:
        if args.scenarios[-1] != "one-rank":
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
