"""Adapter checkpoints: PEFT 0.21's on-disk format, both directions, atomic saves, clear errors on bad files."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import safetensors.torch

import fastadalora
from fastadalora import checkpoint as ck
from fastadalora.layers import AdaLoraLinear
from crash_worker import tree
from support import batches, tiny_bert, tiny_gpt2_lm

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8)
STEPS = 5  # masks at steps 2, 3, 4: rank_pattern set and tensors sliced at save
LR = 0.05
LORA = ("lora_A", "lora_E", "lora_B")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- builders
CASES = {
    "bert": dict(build=tiny_bert, kind="cls", fa=dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                                                     task_type="SEQ_CLS"),
                 peft=dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2": dict(build=tiny_gpt2_lm, kind="lm", fa=dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                        task_type="CAUSAL_LM"),
                 peft=dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
}


def _train(model, update, kind, steps=STEPS, seed=0):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step, batch in enumerate(batches(steps, kind=kind, seed=seed)):
        model(**batch).loss.backward()
        opt.step()
        update(step)
        opt.zero_grad()
    model.eval()
    return model


_CACHE: dict = {}


def _cached(key, make):
    """Training is deterministic (fixed seeds): train once per module, hand out deep copies."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return copy.deepcopy(_CACHE[key])


def fa_trained(case, steps=STEPS):
    def make():
        c = CASES[case]
        am = fastadalora.get_adalora_model(c["build"](seed=0), fastadalora.AdaLoraConfig(**SCHEDULE, **c["fa"]))
        return _train(am, am.update_and_allocate, c["kind"], steps)

    return _cached(("fa", case, steps), make)


def peft_trained(case, steps=STEPS):
    def make():
        c = CASES[case]
        pm = peft.get_peft_model(c["build"](seed=0), peft.AdaLoraConfig(**SCHEDULE, **c["peft"]))
        return _train(pm, pm.base_model.update_and_allocate, c["kind"], steps)

    return _cached(("peft", case, steps), make)


def outputs(model, case):
    batch = dict(batches(1, kind=CASES[case]["kind"], seed=123)[0])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def snapshot(model):
    types = {n: type(m) for n, m in model.named_modules()}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return types, sd, grads, model.training


def assert_same_snapshot(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k
    assert before[2] == after[2] and before[3] == after[3]


def files(d):
    """The files of ``d``, read through symlinks (the PEFT names link into ``.fastadalora``); directories skipped."""
    return {name: (d / name).read_bytes() for name in sorted(os.listdir(d)) if not (d / name).is_dir()}


def assert_one_version(d):
    """The saved layout, with no temporary left: the two PEFT names linked through ``current`` to one version,
    and PEFT's model card."""
    assert sorted(os.listdir(d)) == [".fastadalora", "README.md", ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    for name in (ck.CONFIG_NAME, ck.WEIGHTS_NAME):
        assert os.readlink(d / name) == f".fastadalora/current/{name}"
    version = os.readlink(d / ".fastadalora" / "current")
    assert sorted(os.listdir(d / ".fastadalora")) == sorted(["current", "lock", version])
    assert sorted(os.listdir(d / ".fastadalora" / version)) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]


# --------------------------------------------------------------------------- format
def test_saved_format_matches_peft(tmp_path):
    """Same tensor keys, no ranknum, sliced shapes, rank_pattern keys and config fields as PEFT 0.21 writes."""
    pm = peft_trained("bert")
    pm.save_pretrained(tmp_path / "peft")
    am = fa_trained("bert")
    am.save_pretrained(tmp_path / "fa")

    peft_sd = safetensors.torch.load_file(tmp_path / "peft" / ck.WEIGHTS_NAME)
    fa_sd = safetensors.torch.load_file(tmp_path / "fa" / ck.WEIGHTS_NAME)
    assert fa_sd.keys() == peft_sd.keys()
    assert "base_model.model.classifier.weight" in fa_sd
    assert not any("ranknum" in k or "default" in k for k in fa_sd)

    peft_cfg = json.loads((tmp_path / "peft" / ck.CONFIG_NAME).read_text())
    fa_cfg = json.loads((tmp_path / "fa" / ck.CONFIG_NAME).read_text())
    for key in ("peft_type", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "lora_alpha", "lora_dropout", "bias", "init_lora_weights", "task_type", "fan_in_fan_out"):
        assert fa_cfg[key] == peft_cfg[key], key
    assert sorted(fa_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])
    assert "classifier" in fa_cfg["modules_to_save"]
    assert fa_cfg["rank_pattern"].keys() == peft_cfg["rank_pattern"].keys()
    # tensors hold exactly the kept triplets
    for key, keep in fa_cfg["rank_pattern"].items():
        assert len(keep) == SCHEDULE["init_r"]
        path = key[: -len(".lora_E")]
        assert fa_sd[f"base_model.model.{path}.lora_E"].shape == (sum(keep), 1)
        assert fa_sd[f"base_model.model.{path}.lora_A"].shape[0] == sum(keep)
        assert fa_sd[f"base_model.model.{path}.lora_B"].shape[1] == sum(keep)
    assert any(sum(k) < SCHEDULE["init_r"] for k in fa_cfg["rank_pattern"].values())


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_fastadalora_to_peft(tmp_path, case):
    am = fa_trained(case)
    assert am.rank_pattern is not None
    expected = outputs(am, case)
    am.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(CASES[case]["build"](seed=0), tmp_path)
    assert_close(outputs(pm, case), expected)


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_peft_to_fastadalora(tmp_path, case):
    pm = peft_trained(case)
    expected = outputs(pm, case)
    pm.save_pretrained(tmp_path)
    rank_pattern = json.loads((tmp_path / ck.CONFIG_NAME).read_text())["rank_pattern"]
    assert rank_pattern
    am = fastadalora.AdaLoraModel.from_pretrained(CASES[case]["build"](seed=0), tmp_path)
    assert_close(outputs(am, case), expected)
    for path, layer in am.adapter_layers().items():
        assert layer.r == sum(rank_pattern[f"{path}.lora_E"])
        assert layer.ranknum == float(SCHEDULE["init_r"])  # the scale stays PEFT's
    # inference mode: frozen, eval
    assert not am.training
    assert not any(p.requires_grad for p in am.parameters())


def test_push_to_hub_uploads_the_peft_files(tmp_path, monkeypatch):
    """With a stand-in for ``huggingface_hub.HfApi`` (no network here): the repo is made, the PEFT files are
    uploaded (read through their links, without fastadalora's version folder), and PEFT loads the upload."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, token=None):
            calls["create_repo"] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, ignore_patterns, commit_message, **kwargs):
            calls["upload"] = (repo_id, commit_message, kwargs["revision"], kwargs["create_pr"])
            root = Path(folder_path)
            names = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
            for name in filter_repo_objects(names, ignore_patterns=ignore_patterns):
                (tmp_path / "hub" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / name, tmp_path / "hub" / name)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    am = fa_trained("bert")
    assert am.push_to_hub("me/adapter", private=True, token="t", revision="dev") == "commit-info"
    assert calls == {"token": "t", "create_repo": ("me/adapter", True, True),
                     "upload": ("me/adapter", "Upload model", "dev", False)}
    assert sorted(os.listdir(tmp_path / "hub")) == ["README.md", ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    pm = peft.PeftModel.from_pretrained(tiny_bert(seed=0), tmp_path / "hub")
    assert_close(outputs(pm, "bert"), outputs(am, "bert"))


def test_inference_model_has_a_state_dict(tmp_path):
    """A model loaded for inference (no allocator) gives a state dict, loads it back, and saves again."""
    am = fa_trained("bert")
    am.save_pretrained(tmp_path / "a")
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path / "a")
    assert loaded.allocator is None
    sd = loaded.state_dict()
    assert "_extra_state" in sd and any(k.endswith("lora_A") for k in sd)
    other = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path / "a")
    other.load_state_dict(sd)
    assert_close(outputs(other, "bert"), outputs(am, "bert"))
    loaded.save_pretrained(tmp_path / "b")
    assert files(tmp_path / "a")[ck.WEIGHTS_NAME] == files(tmp_path / "b")[ck.WEIGHTS_NAME]


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_fastadalora_round_trip_and_resave(tmp_path, case):
    am = fa_trained(case)
    expected = outputs(am, case)
    am.save_pretrained(tmp_path / "a")
    loaded = fastadalora.AdaLoraModel.from_pretrained(CASES[case]["build"](seed=0), tmp_path / "a")
    assert_close(outputs(loaded, case), expected)
    # a loaded (resized) model saves the same checkpoint again, rank pattern positions included
    loaded.save_pretrained(tmp_path / "b")
    a_cfg = json.loads((tmp_path / "a" / ck.CONFIG_NAME).read_text())
    b_cfg = json.loads((tmp_path / "b" / ck.CONFIG_NAME).read_text())
    assert a_cfg == b_cfg
    a_sd = safetensors.torch.load_file(tmp_path / "a" / ck.WEIGHTS_NAME)
    b_sd = safetensors.torch.load_file(tmp_path / "b" / ck.WEIGHTS_NAME)
    assert a_sd.keys() == b_sd.keys() and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)
    # and PEFT reads the re-saved one
    pm = peft.PeftModel.from_pretrained(CASES[case]["build"](seed=0), tmp_path / "b")
    assert_close(outputs(pm, case), expected)


def test_unpruned_checkpoint_has_no_rank_pattern(tmp_path):
    am = fa_trained("bert", steps=1)  # no mask yet (tinit=1)
    am.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ck.CONFIG_NAME).read_text())["rank_pattern"] is None
    pm = peft.PeftModel.from_pretrained(tiny_bert(seed=0), tmp_path)
    assert_close(outputs(pm, "bert"), outputs(am, "bert"))


def test_default_target_modules_are_written_resolved(tmp_path):
    """target_modules=None resolves to the model type's default; the file names it so PEFT targets the same."""
    am = fastadalora.get_adalora_model(tiny_gpt2_lm(seed=0), fastadalora.AdaLoraConfig(**SCHEDULE))
    am.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / ck.CONFIG_NAME).read_text())
    assert cfg["target_modules"] == ["c_attn"] and cfg["fan_in_fan_out"] is True
    assert cfg["task_type"] is None and cfg["modules_to_save"] is None
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_gpt2_lm(seed=0), tmp_path)
    assert list(loaded.adapter_layers()) == list(am.adapter_layers())


def test_is_trainable_continues_from_loaded_ranks(tmp_path):
    pm = peft_trained("bert")
    pm.save_pretrained(tmp_path)
    am = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path, is_trainable=True)
    am.train()
    ranks = [layer.r for layer in am.adapter_layers().values()]
    assert am.allocator.init_bgt == sum(ranks) < SCHEDULE["init_r"] * len(ranks)
    for layer in am.adapter_layers().values():
        assert all(getattr(layer, n).requires_grad for n in LORA)
    assert am.model.classifier.weight.requires_grad
    # the rest of the schedule runs (masking and the fixed phase) without error
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=LR)
    for step, batch in zip(range(STEPS, SCHEDULE["total_step"]), batches(5, seed=50)):
        am(**batch).loss.backward()
        opt.step()
        am.update_and_allocate(step)
        opt.zero_grad()
    am.save_pretrained(tmp_path / "again")
    loaded = peft.PeftModel.from_pretrained(tiny_bert(seed=0), tmp_path / "again")
    assert_close(outputs(loaded, "bert"), outputs(am, "bert"))


# --------------------------------------------------------------------------- save has no side effects
def test_save_does_not_change_live_model_or_config(tmp_path):
    am = fa_trained("bert")
    am.train()
    before = snapshot(am)
    cfg_before = copy.deepcopy(am.adalora_config)
    pattern_before = copy.deepcopy(am.rank_pattern)
    am.save_pretrained(tmp_path)
    assert_same_snapshot(before, snapshot(am))
    assert am.adalora_config == cfg_before and am.adalora_config.rank_pattern is None
    assert am.rank_pattern == pattern_before
    assert [layer.r for layer in am.adapter_layers().values()] == [SCHEDULE["init_r"]] * 4
    assert_one_version(tmp_path)  # no temporary files left
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    for name in (ck.CONFIG_NAME, ck.WEIGHTS_NAME):  # usual permissions (umask), not a temp file's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_save_into_a_file_path_raises_and_writes_nothing(tmp_path):
    am = fa_trained("bert")
    target = tmp_path / "a_file"
    target.write_bytes(b"not a directory")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    for path in (target, dangling):
        with pytest.raises(ValueError, match=f"save_pretrained: {path} exists and is not a directory"):
            am.save_pretrained(path)
    assert target.read_bytes() == b"not a directory" and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling"]


# --------------------------------------------------------------------------- atomicity
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    am = fa_trained("bert", steps=3)
    am.save_pretrained(tmp_path)
    good = tree(tmp_path)  # everything, hidden versions and links included
    expected = outputs(am, "bert")
    _train(am, lambda s: am.update_and_allocate(s + 3), "cls", steps=2, seed=10)  # the live model moves on

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        am.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert tree(tmp_path) == good  # nothing replaced, no temporary left

    # a failure while writing the config, after the weights were written
    def fail_json(obj, path):
        raise OSError("killed")

    monkeypatch.setattr(ck.files, "_write_json", fail_json)
    with pytest.raises(OSError, match="killed"):
        am.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert tree(tmp_path) == good
    assert_close(outputs(fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path), "bert"), expected)


KILL_SCRIPT = r"""
import os, signal, sys, torch, safetensors.torch, fastadalora
from fastadalora import checkpoint as ck
torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
am = fastadalora.get_adalora_model(model, fastadalora.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                    target_modules=["0", "2"]))
with torch.no_grad():
    for layer in am.adapter_layers().values():
        layer.lora_E.fill_(float(sys.argv[2]))
if sys.argv[3] == "kill":
    real = safetensors.torch.save_file
    def half_then_die(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = half_then_die
am.save_pretrained(sys.argv[1])
"""


def test_killed_save_keeps_previous_checkpoint(tmp_path):
    """A process SIGKILLed in the middle of writing leaves the previous checkpoint loadable and unchanged."""
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    first = run("0.5", "save")
    assert first.returncode == 0, first.stderr
    good, layout = files(tmp_path), tree(tmp_path)
    killed = run("0.25", "kill")
    assert killed.returncode == -9, killed.stderr
    assert files(tmp_path) == good  # the names PEFT opens still resolve to the previous checkpoint
    now = tree(tmp_path)
    assert {k: now[k] for k in layout} == layout
    left = set(now) - set(layout)  # the leftover is the killed save's hidden, unreferenced version
    assert left and all(k.startswith(".fastadalora/v-") for k in left), left

    def lora_E():
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        am = fastadalora.AdaLoraModel.from_pretrained(model, tmp_path)
        return {float(v) for layer in am.adapter_layers().values() for v in layer.lora_E.flatten()}

    assert lora_E() == {0.5}
    again = run("0.75", "save")  # the next save removes what the killed one left
    assert again.returncode == 0, again.stderr
    assert_one_version(tmp_path)
    assert lora_E() == {0.75}


# --------------------------------------------------------------------------- bad checkpoints
@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("good")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa_trained("bert").save_pretrained(d)
    return d


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name, data in files(src).items():
        (dst / name).write_bytes(data)
    return dst


def _edit_weights(d, fn):
    sd = safetensors.torch.load((d / ck.WEIGHTS_NAME).read_bytes())  # not memory-mapped: we overwrite the file
    sd = fn(dict(sd))
    safetensors.torch.save_file(sd, str(d / ck.WEIGHTS_NAME), metadata={"format": "pt"})


def _edit_config(d, fn):
    cfg = json.loads((d / ck.CONFIG_NAME).read_text())
    fn(cfg)
    (d / ck.CONFIG_NAME).write_text(json.dumps(cfg))


Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def _wrong_shape(sd):
    sd[f"{Q0}.lora_A"] = torch.zeros(sd[f"{Q0}.lora_A"].shape[0], 31)
    return sd


def _unknown_module(sd):
    for n in LORA:
        sd[f"base_model.model.bert.encoder.layer.7.attention.self.query.{n}"] = sd[f"{Q0}.{n}"].clone()
    return sd


def _missing_module(sd):
    return {k: v for k, v in sd.items() if not k.startswith(Q0 + ".")}


def _extra_key(sd):
    sd["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    return sd


def _missing_head(sd):
    return {k: v for k, v in sd.items() if "classifier" not in k}


def _truncate(d):
    data = (d / ck.WEIGHTS_NAME).read_bytes()
    (d / ck.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _pickle(d):
    sd = safetensors.torch.load((d / ck.WEIGHTS_NAME).read_bytes())
    torch.save(sd, d / ck.WEIGHTS_NAME)


def _garbage_json(d):
    (d / ck.CONFIG_NAME).write_text('{"peft_type": "ADALORA", "init_r": 4,')


def _pattern_too_long(cfg):
    key = next(iter(cfg["rank_pattern"]))
    cfg["rank_pattern"][key] = cfg["rank_pattern"][key] + [True]


def _pattern_count_mismatch(cfg):
    key = next(iter(cfg["rank_pattern"]))
    cfg["rank_pattern"][key] = [not v for v in cfg["rank_pattern"][key]] if sum(cfg["rank_pattern"][key]) * 2 != len(
        cfg["rank_pattern"][key]) else [True] * len(cfg["rank_pattern"][key])


def _pattern_unknown_key(cfg):
    cfg["rank_pattern"]["bert.encoder.layer.9.attention.self.query.lora_E"] = [True] * 4


def _other_targets(cfg):
    cfg["target_modules"] = ["query"]


def _not_adalora(cfg):
    cfg["peft_type"] = "LORA"


BAD = {
    "wrong_shape": (lambda d: _edit_weights(d, _wrong_shape), "shape"),
    "unknown_module": (lambda d: _edit_weights(d, _unknown_module), "does not have"),
    "missing_module": (lambda d: _edit_weights(d, _missing_module), "no adapter weights"),
    "extra_key": (lambda d: _edit_weights(d, _extra_key), "unexpected key"),
    "missing_head": (lambda d: _edit_weights(d, _missing_head), "no weights for"),
    "truncated": (_truncate, "adapter_model.safetensors"),
    "pickle": (_pickle, "adapter_model.safetensors"),
    "garbage_json": (_garbage_json, "adapter_config.json"),
    "pattern_too_long": (lambda d: _edit_config(d, _pattern_too_long), "rank_pattern"),
    "pattern_count": (lambda d: _edit_config(d, _pattern_count_mismatch), "rank_pattern keeps"),
    "pattern_unknown": (lambda d: _edit_config(d, _pattern_unknown_key), "rank_pattern"),
    "other_targets": (lambda d: _edit_config(d, _other_targets), "does not select"),
    "not_adalora": (lambda d: _edit_config(d, _not_adalora), "ADALORA"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_checkpoint_is_rejected_and_model_untouched(tmp_path, good_ckpt, bad, monkeypatch):
    corrupt, message = BAD[bad]
    d = _copy(good_ckpt, tmp_path / bad)
    corrupt(d)
    model = tiny_bert(seed=0)
    before = snapshot(model)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ValueError, match=message):
        fastadalora.AdaLoraModel.from_pretrained(model, d)
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(model))
    assert not any(isinstance(m, AdaLoraLinear) for m in model.modules())


def test_wrong_base_model_is_rejected(good_ckpt):
    model = tiny_bert(seed=0, hidden=48)
    before = snapshot(model)
    with pytest.raises(ValueError, match="in_features=48"):
        fastadalora.AdaLoraModel.from_pretrained(model, good_ckpt)
    assert_same_snapshot(before, snapshot(model))


def test_good_checkpoint_still_loads(good_ckpt):
    am = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), good_ckpt)
    assert len(am.adapter_layers()) == 4


def test_missing_directory_or_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), tmp_path)
