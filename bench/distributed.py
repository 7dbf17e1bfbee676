"""``python -m bench.distributed``: what rank allocation costs under torch.distributed.

1. Bytes per allocation step under FSDP2 (counted from the allocator's layouts, no run needed):
   the allocator's one all-gather of per-triplet partial sums (``3·R + 1`` values per rank)
   against an all-gather of the adapters' full gradients, the naive way to score sharded triplets;
   also the orthogonal term's all-gather per forward (A rows and B's r×r partial Grams).
2. Step time on CPU with gloo and 2 processes: a BERT-style model trained with DDP and with FSDP2
   (fully_shard on the blocks and the root), with ``update_and_allocate`` every step (a masking step
   every ``deltaT=1``) and without it; the overhead is the difference of the medians.

    python -m bench.distributed            # about a minute on 2 cores
    python -m bench.distributed --steps 6  # shorter
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from fastadalora.distributed import chunk_rows  # noqa: E402
from fastadalora.flat_layout import FlatLayout  # noqa: E402

# --------------------------------------------------------------------------- 1. bytes
MODELS = {  # name: (layers, [(in, out) per adapted module of a layer]), init_r
    "BERT-base (q,k,v,o,fc1,fc2)": (12, [(768, 768)] * 4 + [(768, 3072), (3072, 768)], 12),
    "LLaMA-7B (q,k,v,o,gate,up,down)": (32, [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)], 12),
}


def _shard_elems(n_rows: int, cols: int, parts: int) -> int:
    return max(chunk_rows(n_rows, parts, c)[1] for c in range(parts)) * cols


def bytes_per_step(layers: int, modules, r: int, world: int, elem: int = 4) -> dict:
    shapes = [(r, i, o) for _ in range(layers) for i, o in modules]
    layout = FlatLayout(shapes)
    R = layout.n_triplets
    ours = world * (3 * R + 1) * elem  # the gathered buffer: every rank's 3R+1 values
    grads = layout.n * elem  # an all-gather of the sharded gradients: every rank ends up with all n values
    orth = world * sum(_shard_elems(r, i, world) + r * r for r, i, _ in shapes) * elem
    return {"triplets": R, "elements": layout.n, "ours": ours, "full_grads": grads, "orth": orth}


def _mb(b: float) -> str:
    return f"{b / 2**20:.3f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def print_bytes(world: int) -> None:
    print(f"\n## Bytes per allocation step under FSDP2 ({world} ranks, fp32; the gathered buffer on each rank)\n")
    print("| model | triplets R | adapter elements | allocator all-gather (3R+1 per rank) "
          "| all-gather of full gradients | ratio | orth term all-gather per forward |")
    print("|---|---|---|---|---|---|---|")
    for name, (layers, modules, r) in MODELS.items():
        b = bytes_per_step(layers, modules, r, world)
        print(f"| {name}, r={r} | {b['triplets']:,} | {b['elements']:,} | {_mb(b['ours'])} | {_mb(b['full_grads'])} "
              f"| {b['ours'] / b['full_grads']:.5f} | {_mb(b['orth'])} |")


# --------------------------------------------------------------------------- 2. step time
def _worker(rank: int, world: int, port: int, mode: str, steps: int, queue) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from transformers import BertConfig, BertForSequenceClassification

        import fastadalora

        cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, attn_implementation="eager")
        times = {}
        for allocate in (False, True, False, True):  # interleaved, twice each
            torch.manual_seed(0)
            model = fastadalora.get_adalora_model(BertForSequenceClassification(cfg), fastadalora.AdaLoraConfig(
                init_r=12, target_r=4, tinit=0, tfinal=1, deltaT=1, total_step=10_000, task_type="SEQ_CLS",
                target_modules=["query", "key", "value", "dense"]))
            model.train()
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                module = DDP(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (world,))
                for block in model.model.bert.encoder.layer:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
                module = model
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            g = torch.Generator().manual_seed(rank)
            batch = {"input_ids": torch.randint(0, 1000, (8, 64), generator=g),
                     "labels": torch.randint(0, 2, (8,), generator=g)}
            spent = []
            for step in range(steps + 2):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                module(**batch).loss.backward()
                opt.step()
                if allocate:
                    model.update_and_allocate(step)
                opt.zero_grad()
                torch.distributed.barrier()
                if step >= 2:
                    spent.append(time.perf_counter() - t0)
            times.setdefault(allocate, []).extend(spent)
        if rank == 0:
            queue.put({k: statistics.median(v) for k, v in times.items()})
    finally:
        torch.distributed.destroy_process_group()


def step_times(mode: str, steps: int, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, mode, steps, queue), nprocs=world, start_method="spawn")
    return queue.get()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run (each mode runs twice, interleaved)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--only", choices=["bytes", "time"], default=None)
    args = ap.parse_args(argv)
    if args.only in (None, "bytes"):
        print_bytes(args.world)
        print_bytes(8)
    if args.only in (None, "time"):
        print(f"\n## Step time, CPU gloo, {args.world} processes x 1 thread, BERT 4 layers hidden 256, 25 adapters "
              f"r=12, batch 8x64 per rank, fp32; medians of {2 * args.steps} steps\n")
        print("| engine | step without allocation | with update_and_allocate (masking every step) | overhead |")
        print("|---|---|---|---|")
        for mode in ("ddp", "fsdp2"):
            t = step_times(mode, args.steps, args.world)
            off, on = t[False], t[True]
            print(f"| {mode} | {off * 1e3:.1f} ms | {on * 1e3:.1f} ms | {(on - off) * 1e3:+.2f} ms "
                  f"({100 * (on - off) / off:+.1f}%) |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
