"""torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 against one process, checkpoints, resume, misuse.

The ranks run ``tests/dist_worker.py`` (one launch for the training scenarios, one for the resumes);
the one-process twin (``dist_worker.run(..., "single")``) runs here.  float64, tiny BERT and GPT-2,
the whole schedule (budgeting phase, the forced final mask, the fixed phase), the orthogonal term on.
``tests/dist_trainer.py`` is the ``transformers.Trainer`` job that ``torchrun`` and
``accelerate launch`` run.  Every launch binds a free port, is bounded by a timeout and is killed
(with its children) on failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import fastadalora
import dist_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
HERE = Path(__file__).parent
HSDP_SCENARIOS = ["hsdp-1x2-bert", "hsdp-2x1-bert", "hsdp-1x2-gpt2"]
TRAIN_SCENARIOS = ["ddp-bert", "ddp-inner-bert", "ddp-gpt2", "ddp-inner-gpt2", "fsdp-bert", "fsdp-gpt2", *HSDP_SCENARIOS,
                   "mismatch", "diverge", "one-rank-fsdp", "one-rank"]  # one-rank last: rank 1 never makes the side group
RESUME_AT = (7, 13)  # the budgeting phase; the fixed phase (the final mask is at step 12)
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


def _run(cmds: list[list[str]], cwd: Path, log: Path) -> None:
    """Start the commands (one process group each), wait for all, kill them all on failure or timeout."""
    procs, logs = [], []
    try:
        for i, cmd in enumerate(cmds):
            f = open(log.with_suffix(f".{i}.log"), "w")
            logs.append(f)
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    text = "\n".join(log.with_suffix(f".{i}.log").read_text()[-4000:] for i in range(len(cmds)))
    assert all(p.returncode == 0 for p in procs), f"launch failed ({[p.returncode for p in procs]}):\n{text}"


def _launch(out: Path, scenarios: list[str], world: int = 2) -> None:
    port = _free_port()
    _run([[sys.executable, str(HERE / "dist_worker.py"), "--rank", str(r), "--world", str(world), "--port", str(port),
           "--out", str(out), *scenarios] for r in range(world)], HERE, out / "launch")


def _results(out: Path, name: str, world: int = 2) -> list[dict]:
    rs = [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(world)]
    for r in rs:
        assert "error" not in r or name in ("mismatch", "diverge", "one-rank", "one-rank-fsdp"), r.get("traceback")
    return rs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _launch(out, TRAIN_SCENARIOS)
    _launch(out, [f"fsdp-resume-bert-{at}" for at in RESUME_AT])
    return out


@pytest.fixture(scope="module")
def single():
    """The one-process twin on the whole batch (2 ranks x 2 rows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {kind: W.run(kind, "single") for kind in ("bert", "gpt2")}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape, what
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (what, float((a - b).abs().max()))


def _compare_with_single(ranks: list[dict], ref: dict) -> None:
    # the loss of the whole batch is the mean of the ranks' losses (equal shards; the orth term is the same)
    mean = [sum(r["losses"][t] for r in ranks) / len(ranks) for t in range(len(ref["losses"]))]
    _close(torch.tensor(mean, dtype=torch.float64), torch.tensor(ref["losses"], dtype=torch.float64), "losses")
    assert ref["patterns"][-1] is not None and not all(ref["patterns"][-1])  # the schedule pruned
    for r in ranks:  # every rank, every step: the one-process pattern, exactly
        assert r["patterns"] == ref["patterns"]
        assert r["trainable"].keys() == ref["trainable"].keys()
        for k in ref["trainable"]:
            _close(r["trainable"][k], ref["trainable"][k], k)
        for k in ("ipt", "unc"):  # the EMAs just before the final mask
            _close(r["mid_allocator"][k], ref["mid_allocator"][k], k)
        _close(r["logits"], ref["logits"], "logits")
    for key, value in ranks[0]["mid_allocator"].items():  # identical EMAs and masks on every rank
        for r in ranks[1:]:
            other = r["mid_allocator"][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


@pytest.mark.parametrize("name", ["ddp-bert", "ddp-inner-bert", "ddp-gpt2", "ddp-inner-gpt2"])
def test_ddp_two_ranks_match_one_process(runs, single, name):
    """DDP over the AdaLoraModel or over its .model (orthogonal term added by hand): 2 ranks x 2 rows == 1 x 4."""
    _compare_with_single(_results(runs, name), single["gpt2" if "gpt2" in name else "bert"])


@pytest.mark.parametrize("name", ["fsdp-bert", "fsdp-gpt2"])
def test_fsdp2_two_ranks_match_one_process(runs, single, name):
    """fully_shard on the blocks and the root: sharded EMAs, one all-gather of partial scores, sharded orth term.

    init_r=3 over 2 ranks gives uneven shards of A and E (2 + 1 rows); BERT's pooler adapter sits in
    the root's group (unsharded while the orthogonal term is computed), GPT-2's embeddings are tied.
    """
    _compare_with_single(_results(runs, name), single["gpt2" if "gpt2" in name else "bert"])


@pytest.mark.parametrize("name", HSDP_SCENARIOS)
def test_hsdp_two_ranks_match_one_process(runs, single, name):
    """FSDP2 on a 2-D ("replicate", "shard") mesh: 1x2 shards over the mesh's second dimension, 2x1
    replicates whole parameters (placements ``(Replicate(), Shard(0))`` on a shard dimension of size 1)."""
    _compare_with_single(_results(runs, name), single["gpt2" if "gpt2" in name else "bert"])


def test_hsdp_2x2_on_four_ranks_matches_one_process(tmp_path):
    """Both mesh dimensions above 1: two replicas, each sharded over 2 ranks (4 processes, 2 rows each)."""
    _launch(tmp_path, ["hsdp-2x2-bert"], world=4)
    ranks = _results(tmp_path, "hsdp-2x2-bert", world=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = W.run("bert", "single", world=4)
    _compare_with_single(ranks, ref)


@pytest.mark.parametrize("name", ["fsdp-bert", "fsdp-gpt2", *HSDP_SCENARIOS])
def test_save_on_sharded_model_loads_in_one_process(runs, name):
    kind = "gpt2" if "gpt2" in name else "bert"
    rank0 = _results(runs, name)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = (W.tiny_bert if kind == "bert" else W.tiny_gpt2_lm)(seed=0, dtype=torch.float64)  # the same base
        loaded = fastadalora.AdaLoraModel.from_pretrained(base, runs / f"adapter-{name}")
    with torch.no_grad():
        logits = loaded(**W.eval_batch(kind)).logits
    assert torch.allclose(logits, rank0["logits"], rtol=0, atol=1e-12), float((logits - rank0["logits"]).abs().max())
    pattern = json.loads((runs / f"adapter-{name}" / "adapter_config.json").read_text())["rank_pattern"]
    assert [f for k in sorted(pattern) for f in pattern[k]] == rank0["patterns"][-1]
    assert sum(layer.r for layer in loaded.adapter_layers().values()) == sum(rank0["patterns"][-1])  # resized


@pytest.mark.parametrize("at", RESUME_AT, ids=["budgeting-phase", "fixed-phase"])
def test_sharded_resume_is_bit_exact(runs, at):
    """A full state dict (DCP get/set_model_state_dict) saved mid-run, loaded into a new sharded model, new processes."""
    for rank, straight in enumerate(_results(runs, "fsdp-bert")):
        resumed = _results(runs, f"fsdp-resume-bert-{at}")[rank]
        assert resumed["losses"] == straight["losses"][at:]
        assert resumed["patterns"] == straight["patterns"][at:]
        for k, v in straight["trainable"].items():
            assert torch.equal(v, resumed["trainable"][k]), k
        for k, v in straight["allocator"].items():
            other = resumed["allocator"][k]
            assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other, k


def test_different_adapter_layouts_raise_on_every_rank(runs):
    for r in _results(runs, "mismatch"):
        assert r["error"].startswith("RankMismatchError: update_and_allocate: the ranks hold different adapter layouts")
        assert "rank 0: 6 adapters" in r["error"] and "rank 1: 4 adapters" in r["error"]


def test_diverged_ddp_replicas_raise_at_the_masking_step(runs):
    for r in _results(runs, "diverge"):
        assert r["error"].startswith("RankMismatchError: update_and_allocate at step 4: the ranks' sensitivity EMAs")
        assert "no_sync()" in r["error"]


@pytest.mark.parametrize("name", ["one-rank", "one-rank-fsdp"])
def test_update_and_allocate_on_one_rank_fails_instead_of_hanging(runs, name):
    """DDP: rank 0 alone at the first step (the side group's set-up times out); FSDP2: rank 0 alone at
    step 1 (the per-step all-gather times out).  Both after ``configure(timeout=3 s)``."""
    rank0, rank1 = _results(runs, name)
    assert rank0["error"].startswith("RankMismatchError: update_and_allocate: rank 0 waited 0:00:03")
    assert "every rank" in rank0["error"].lower()
    assert "error" not in rank1  # the rank that skipped it sees nothing wrong: it never entered the collective


# --------------------------------------------------------------------------- launchers + Trainer
def _trainer_result(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == 2 and result["pruned"] and result["last_step"] == 7
    assert result["same_tensors"] and result["same_allocator"] and result["same_pattern"], result
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(result["checkpoint_files"])
    return result


def test_torchrun_trainer_ddp_checkpoint_and_resume(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    _run([[*torchrun, str(HERE / "dist_trainer.py"), "--out", str(tmp_path)]], HERE, tmp_path / "torchrun")
    result = _trainer_result(tmp_path)
    assert result["wrapper"] == "DistributedDataParallel" and not result["sharded"]


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_trainer_fsdp2_checkpoint_and_resume(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (on CPU: its torchrun path; ``--cpu`` starts one
    process unless MPI is set up) with ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``."""
    exe = Path(sys.executable).with_name("accelerate")
    cmd = [str(exe) if exe.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(HERE / "dist_trainer.py"), "--fsdp", "--out", str(tmp_path)]
    _run([cmd], HERE, tmp_path / "accelerate")
    result = _trainer_result(tmp_path)
    assert result["wrapper"] == "FSDPAdaLoraModel" and result["sharded"]
    assert "pytorch_model_fsdp.bin" in result["checkpoint_files"]


# --------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_hidden_gradients_raise_a_clear_error(monkeypatch):
    """With DeepSpeed in the process a missing gradient is explained (ZeRO keeps it in its own buffers)."""
    model = W.build("bert")
    model.train()
    model(**W.global_batch("bert", 0, 1)).loss.backward()
    model.zero_grad(set_to_none=True)  # what a ZeRO engine's step leaves behind
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    with pytest.raises(RuntimeError, match="DeepSpeed is in use.*safe_get_full_grad.*FSDP2"):
        model.update_and_allocate(0)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_trainer_fails_clearly(tmp_path):
    """``TrainingArguments(deepspeed={"zero_optimization": {"stage": 2}})`` under torchrun: a clear error, no hang."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _run([[*torchrun, str(HERE / "dist_trainer.py"), "--deepspeed", "--out", str(tmp_path)]], HERE, tmp_path / "ds")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["wrapper"] == "DeepSpeedEngine"
    assert "no gradient, and DeepSpeed is in use" in result["error"]
