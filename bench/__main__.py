"""``python -m bench``: run every comparison interleaved and summarise.

Prints a markdown table of ratios (ours / PEFT AdaLoRA, ours / PEFT LoRA at r = init_r; below 1
means fastadalora is faster or smaller), the analytic HBM traffic of the layer (analysis, not
measurement), and writes ``bench/results/results.csv`` and ``bench/results/ratios.png``.

    python -m bench            # CPU: a representative subset (a few minutes); CUDA: the full grid
    python -m bench --quick    # tiny sizes, seconds (the smoke test)
    python -m bench --device cuda:1 --only layer,train_step
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import cases  # noqa: E402
from .harness import pick_device  # noqa: E402
from .hbm import format_hbm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["case", "mode", "shape", "dtype", "device", "unit", "ours", "peft_adalora", "peft_lora", "bare",
           "ratio_vs_adalora", "ratio_vs_lora", "overhead_ours", "overhead_peft", "overhead_lora", "overhead_ratio",
           "note"]


def _fmt(v, unit: str) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if unit == "bytes":
        return f"{v / 1e6:.2f} MB"
    return f"{v * 1e3:.2f} ms"


def _r(v) -> str:
    return "" if v is None or v == "" else ("nan" if math.isnan(v) else f"{v:.2f}")


def markdown(rows: list[dict]) -> str:
    head = ("| case | mode | shape | dtype | ours | PEFT AdaLoRA | ours/AdaLoRA | PEFT LoRA | ours/LoRA | "
            "overhead ours | overhead PEFT | overhead ratio |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for row in rows:
        u = row["unit"]
        lines.append("| " + " | ".join([
            row["case"], row["mode"], row["shape"], row["dtype"], _fmt(row.get("ours"), u),
            _fmt(row.get("peft_adalora"), u), _r(row.get("ratio_vs_adalora")), _fmt(row.get("peft_lora"), u),
            _r(row.get("ratio_vs_lora")), _fmt(row.get("overhead_ours"), u), _fmt(row.get("overhead_peft"), u),
            _r(row.get("overhead_ratio")),
        ]) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, vs_ada, vs_lora = [], [], []
    for row in rows:
        labels.append(f"{row['case']} {row['mode']}\n{row['shape']} {row['dtype']}")
        vs_ada.append(row.get("ratio_vs_adalora", float("nan")))
        lr = row.get("ratio_vs_lora")
        vs_lora.append(float("nan") if lr in (None, "") else lr)
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 2.0))
    h = 0.38
    ax.barh([i - h / 2 for i in y], vs_ada, height=h, color="tab:blue", label="ours / PEFT AdaLoRA")
    ax.barh([i + h / 2 for i in y], vs_lora, height=h, color="tab:orange", label="ours / PEFT LoRA (r=init_r)")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio (time or bytes; < 1: fastadalora is faster / smaller)")
    ax.set_title(title, fontsize=9, pad=28)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats (seconds)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--out", default=str(RESULTS), help="folder for results.csv and ratios.png")
    p.add_argument("--only", default=None,
                   help="comma-separated case prefixes: layer,memory,allocator,orth,train_step")
    args = p.parse_args(argv)

    # transformers/PEFT deprecation and layout notices would drown the table
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = pick_device(args.device)
    out = Path(args.out)
    todo = cases.plan(device, quick=args.quick)
    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        todo = [(n, kw) for n, kw in todo if any(n.startswith(k) for k in keep)]
    from fastadalora.backends import resolve_backend

    backend = resolve_backend(torch.empty(1, device=device))
    header = (f"fastadalora bench on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), backend {backend!r}, torch {torch.__version__}")
    print(header)
    print("Interleaved medians; ratios are ours/theirs (< 1: fastadalora faster or smaller). "
          "Timings on a shared machine are noisy.\n", flush=True)

    rows: list[dict] = []
    t_all = time.perf_counter()
    for i, (name, kw) in enumerate(todo, 1):
        t0 = time.perf_counter()
        new = cases.run_case(name, kw, device)
        rows += new
        for row in new:
            print(f"[{i}/{len(todo)}] {row['case']:<20} {row['mode']:<28} {row['shape']:<40} {row['dtype']:<8} "
                  f"ours/AdaLoRA {_r(row.get('ratio_vs_adalora')):>6}  ours/LoRA {_r(row.get('ratio_vs_lora')):>6}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)

    print()
    print(markdown(rows))
    print()
    shape = (4096, 1024, 1024, 12) if not args.quick else (64, 32, 48, 4)
    print(format_hbm(*shape, 4))
    if not args.quick:
        print()
        print(format_hbm(*shape, 2))
    write_csv(rows, out / "results.csv")
    plot(rows, out / "ratios.png", header)
    print(f"\nwrote {out / 'results.csv'} and {out / 'ratios.png'} ({time.perf_counter() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
