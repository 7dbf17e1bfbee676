"""Train a tiny BERT with fastadalora for steps [start, stop), for ``test_resume.py`` (run in a fresh process).

    python resume_worker.py --start 0 --stop 24 --save-at 12 18 --ckpt-dir D --out RESULT
    python resume_worker.py --start 12 --stop 24 --resume D/step12.pt --out RESULT

A checkpoint (``torch.save``) holds the model's ``state_dict()`` (adapters, heads and the
allocator state), the optimizer's, and the torch RNG state (the adapter dropout draws from it).
The result file holds the adapter/head tensors, the rank pattern and the allocator state at ``stop``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastadalora  # noqa: E402
from support import batches, tiny_bert  # noqa: E402

TOTAL_STEP = 24
CONFIG = dict(init_r=4, target_r=2, tinit=2, tfinal=8, deltaT=2, total_step=TOTAL_STEP, lora_alpha=8,
              lora_dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"],
              task_type="SEQ_CLS")
LR = 2e-2


def build():
    torch.manual_seed(0)
    model = fastadalora.get_adalora_model(tiny_bert(seed=0), fastadalora.AdaLoraConfig(**CONFIG))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


def result(model) -> dict:
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"trainable": trainable, "rank_pattern": model.rank_pattern,
            "allocator": model.allocator.state_dict()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--stop", type=int, required=True)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--save-at", type=int, nargs="*", default=[])
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    model, optimizer = build()
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=True)
        assert ckpt["step"] == args.start, (ckpt["step"], args.start)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
    data = batches(TOTAL_STEP, kind="cls", seed=0)
    for step in range(args.start, args.stop):
        if step in args.save_at:
            torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state()}, os.path.join(args.ckpt_dir, f"step{step}.pt"))
        model(**data[step]).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    torch.save(result(model), args.out)


if __name__ == "__main__":
    main()
