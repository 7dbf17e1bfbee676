"""Each benchmark case runs on tiny sizes and yields a finite positive ratio (never a timing threshold)."""

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives at the repository root

from bench import cases  # noqa: E402
from bench.hbm import fastadalora_splits, fastadalora_terms, hbm_bytes  # noqa: E402

CPU = torch.device("cpu")


def _check(rows, keys=("ratio_vs_adalora",)):
    assert rows
    for row in rows:
        for key in keys:
            v = row[key]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, row)


def test_layer_case():
    rows = cases.layer_case(32, 16, 24, 4, torch.float32, ("forward", "backward", "full"), CPU, repeats=2, warmup=1)
    assert [r["mode"] for r in rows] == ["forward", "backward", "full"]
    _check(rows, ("ratio_vs_adalora", "ratio_vs_lora"))
    for row in rows:
        assert row["bare"] > 0 and "overhead_ratio" in row


def test_layers_compute_the_same_output():
    s = cases.setup_layers(16, 8, 12, 3, torch.float32, CPU)
    with torch.no_grad():
        torch.testing.assert_close(s["ours"](s["x"]), s["peft_adalora"](s["x"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", (0.0, 0.1))
def test_memory_case(dropout):
    rows = cases.memory_case(32, 16, 24, 4, torch.float32, CPU, dropout=dropout)
    _check(rows, ("ratio_vs_adalora", "ratio_vs_lora"))
    assert rows[0]["unit"] == "bytes"


def test_allocator_case():
    _check(cases.allocator_case(num_layers=1, hidden=32, init_r=4, device=CPU, repeats=2, warmup=1))


def test_orth_case():
    rows = cases.orth_case(num_layers=1, hidden=32, init_r=4, device=CPU, repeats=2, warmup=1)
    _check(rows)
    assert float(rows[0]["note"].split("=")[-1]) < 1e-4  # both sides compute the same R


@pytest.mark.parametrize("kind", ("bert", "gpt2"))
def test_train_step_case(kind):
    rows = cases.train_step_case(kind, num_layers=1, hidden=32, init_r=4, batch=2, seq=8, device=CPU, repeats=2)
    _check(rows, ("ratio_vs_adalora", "ratio_vs_lora"))


def test_hbm_analysis_terms():
    b = hbm_bytes(4096, 1024, 1024, 12, 4)
    assert set(b) == {"bare", "fastadalora", "peft_adalora", "peft_lora"}
    for path in ("fastadalora", "peft_adalora"):
        assert b[path]["forward"] > b["bare"]["forward"] and b[path]["backward"] > b["bare"]["backward"]
    assert b["fastadalora"]["forward"] < b["peft_adalora"]["forward"]
    # bf16 activations, fp32 adapter: h, gs and every partial are counted at fp32
    n, d_in, d_out, r = 4096, 4096, 4096, 16
    terms = fastadalora_terms(n, d_in, d_out, r, 2, adapter_elt=4)
    sp = fastadalora_splits(n, d_in, d_out, r, 2, 4)
    assert terms["forward"]["shrink"] == n * d_in * 2 + r * d_in * 4 + n * r * 4
    assert sp["T"] > 1 and sp["S"] > 1 and sp["one_pass"]
    assert terms["backward"]["gs reduce"] == (sp["T"] + 1) * n * r * 4
    assert terms["backward"]["grad_g (one pass)"] == (n * d_out * 2 + d_out * r * 4 + n * r * 4 + sp["T"] * n * r * 4
                                                      + sp["S"] * d_out * r * 4 + sp["S"] * sp["T"] * r * 4)
    # above the one-pass tier gs comes from a second read of g instead of partials
    big = fastadalora_terms(n, d_in, d_out, 128, 2)["backward"]
    assert "gs (shrink kernel)" in big and "gs reduce" not in big


def test_quick_summary_writes_csv_and_plot(tmp_path, capsys):
    from bench.__main__ import main

    assert main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| case |" in out and "ANALYSIS" in out
    assert (tmp_path / "results.csv").read_text().count("\n") >= 9
    assert (tmp_path / "ratios.png").read_bytes()[:4] == b"\x89PNG"
