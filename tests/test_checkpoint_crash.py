"""Crash safety of ``write_checkpoint``: a failure, a SIGKILL or a concurrent saver at any instant of a save.

After each injected fault the directory must hold the previous checkpoint or the new one, bit for
bit, read through the names PEFT opens, and load with fastadalora's loader and with
``peft.PeftModel.from_pretrained``; the next save must remove whatever the interrupted one left.
Faults are injected at every file operation of a save (tests/crash_worker.py counts them), from
several starting directories (our layout, PEFT's plain files, an older fastadalora's plain files,
an empty directory, leftovers of a killed save, a copy that followed symlinks).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import safetensors.torch

import fastadalora
from fastadalora import checkpoint as ck
from fastadalora.checkpoint import peft_format
from crash_worker import NAMES, Injected, Injector, disk_bytes, pair, tree
from support import batches, tiny_bert

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"),
                                reason="the symlink layout, flock and fork are POSIX")

STATE = ".fastadalora"
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8)
FA = dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
WORKER = Path(__file__).with_name("crash_worker.py")
EXTRAS = {"optimizer.pt": b"\x80not-ours" * 100, "trainer_state.json": b'{"global_step": 3}\n',
          "runs/events.out": b"tensorboard"}  # what a Trainer keeps next to the adapter: never touched


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- reference checkpoints
def _snapshot(am):
    """``(tensors, config)`` exactly as ``save_pretrained`` would write them now."""
    layers, heads, masks = am.adapter_layers(), am.head_modules(), am.live_masks()
    return (peft_format.adapter_tensors(layers, masks, heads),
            peft_format.config_dict(am.adalora_config, am.model, layers, heads, masks))


def _store(prefix, tensors, config):
    safetensors.torch.save_file(tensors, str(prefix) + ".safetensors", metadata={"format": "pt"})
    Path(str(prefix) + ".json").write_text(json.dumps(config))
    return str(prefix)


class Ref:
    """A checkpoint: tensors and config, its file prefix (for the worker) and the bytes a save writes."""

    def __init__(self, root, name, tensors, config):
        self.name, self.tensors, self.config = name, tensors, config
        self.prefix = _store(root / name, tensors, config)
        d = root / f"{name}.saved"
        ck.write_checkpoint(d, tensors, config)
        self.pair = pair(d)
        assert None not in self.pair


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Three tiny_bert checkpoints whose rank patterns slice the tensors differently (a mix cannot load)."""
    root = tmp_path_factory.mktemp("refs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        am = fastadalora.get_adalora_model(tiny_bert(seed=0), fastadalora.AdaLoraConfig(**SCHEDULE, **FA))
        opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=0.05)
        out = {}
        am.train()
        for step, batch in enumerate(batches(7, seed=3)):
            am(**batch).loss.backward()
            opt.step()
            am.update_and_allocate(step)
            opt.zero_grad()
            if step in (2, 4, 6):
                out[f"r{step}"] = Ref(root, f"r{step}", *_snapshot(am))
        old, new, new2 = out["r2"], out["r4"], out["r6"]
        shapes = [{k: t.shape for k, t in r.tensors.items()} for r in (old, new, new2)]
        assert shapes[0] != shapes[1] != shapes[2], "the references must differ in shape"
        # the same checkpoint as PEFT writes it (plain files: PEFT's own config fields)
        pm = peft.PeftModel.from_pretrained(tiny_bert(seed=0), old.prefix + ".saved")
        pm.save_pretrained(root / "peft_old")
        peft_pair = pair(root / "peft_old")
        assert not os.path.islink(root / "peft_old" / ck.WEIGHTS_NAME)
    return dict(old=old, new=new, new2=new2, peft_old=peft_pair, peft_dir=root / "peft_old", root=root)


# --------------------------------------------------------------------------- starting directories
def _extras(d):
    for rel, data in EXTRAS.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)


def _plain(d, p):
    d.mkdir(parents=True, exist_ok=True)
    for name, data in zip(NAMES, p):
        (d / name).write_bytes(data)


def _scenario(name, refs, d):
    """Build a starting directory; return the pair it holds (None when it holds no checkpoint)."""
    old = refs["old"]
    if name == "fastadalora":
        ck.write_checkpoint(d, old.tensors, old.config)
    elif name == "peft":  # saved by PEFT: plain files
        shutil.copytree(refs["peft_dir"], d)
    elif name == "plain":  # saved by an older fastadalora (plain files), with a temporary file it left
        _plain(d, old.pair)
        (d / ".adapter_model.safetensors.4242.0badf00d.tmp").write_bytes(b"partial" * 1000)
    elif name == "empty":
        d.mkdir(parents=True)
    elif name == "leftovers":  # our layout after killed saves: an orphan version, temporary links and files
        ck.write_checkpoint(d, old.tensors, old.config)
        (d / STATE / "v-1-abc").mkdir()
        (d / STATE / "v-1-abc" / ck.WEIGHTS_NAME).write_bytes(b"partial")
        os.symlink("v-1-abc", d / STATE / ".current.1.0123abcd.tmp")
        os.symlink(f"{STATE}/current/{ck.CONFIG_NAME}", d / f".{ck.CONFIG_NAME}.1.0123abcd.tmp")
    elif name == "copied":  # shutil.copytree without symlinks=True: plain names and a real ``current`` directory
        src = d.with_name(d.name + ".src")
        ck.write_checkpoint(src, old.tensors, old.config)
        shutil.copytree(src, d)
        shutil.rmtree(src)
        assert (d / STATE / "current").is_dir() and not (d / STATE / "current").is_symlink()
    else:
        raise AssertionError(name)
    _extras(d)
    held = pair(d)
    return None if held == (None, None) else held


SCENARIOS = ["fastadalora", "peft", "plain", "empty", "leftovers", "copied"]


class _Templates(dict):
    """Starting directories, each built on first use (and then copied for every run)."""

    def __init__(self, refs, root):
        super().__init__()
        self.refs, self.root = refs, root

    def __missing__(self, name):
        self[name] = (self.root / name, _scenario(name, self.refs, self.root / name))
        return self[name]


@pytest.fixture(scope="module")
def templates(refs, tmp_path_factory):
    return _Templates(refs, tmp_path_factory.mktemp("templates"))


def _fresh(template, d):
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(template, d, symlinks=True)
    return d


# --------------------------------------------------------------------------- checks
def _kind(p):
    if os.path.islink(p):
        target = os.readlink(p)
        return "-> " + "/".join("v" if part.startswith("v-") else part for part in target.split("/"))
    return "dir" if os.path.isdir(p) else "file" if os.path.exists(p) else "missing"


def _loads(d, ref_tensors):
    """fastadalora and PEFT both load ``d``, and hold ``ref_tensors`` bit for bit."""
    am = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0), d)
    got = peft_format.adapter_tensors(am.adapter_layers(), am.live_masks(), am.head_modules())
    assert got.keys() == ref_tensors.keys()
    assert all(torch.equal(got[k], ref_tensors[k]) for k in got)
    pm = peft.PeftModel.from_pretrained(tiny_bert(seed=0), d)
    got = peft.get_peft_model_state_dict(pm)
    assert {k: t for k, t in got.items() if k in ref_tensors}.keys() == ref_tensors.keys()
    assert all(torch.equal(got[k], ref_tensors[k]) for k in ref_tensors)


class Checker:
    """Classifies a directory as the old or the new checkpoint; loads each distinct on-disk layout once."""

    def __init__(self, refs):
        self.refs = refs
        self.seen = set()
        self.loads = 0

    def tensors_of(self, held):
        for r in (self.refs["old"], self.refs["new"], self.refs["new2"]):
            if held == r.pair:
                return r.tensors
        if held == self.refs["peft_old"]:
            return self.refs["old"].tensors
        raise AssertionError("not a reference checkpoint")

    def check(self, d, allowed, what):
        held = pair(d)
        assert held in allowed or (held == (None, None) and None in allowed), \
            f"{what}: the directory holds neither the old nor the new checkpoint: {_describe(d)}"
        for rel, data in EXTRAS.items():
            assert (d / rel).read_bytes() == data, f"{what}: {rel} was touched"
        if held != (None, None):
            sig = (held, tuple(_kind(d / n) for n in NAMES), _kind(d / STATE / "current"))
            if sig not in self.seen:
                self.seen.add(sig)
                self.loads += 1
                _loads(d, self.tensors_of(held))
        return held


def _describe(d):
    return {k: (v if isinstance(v, str) else f"{len(v)} bytes") for k, v in tree(d).items()}


def assert_clean_layout(d):
    """Exactly one version, the two PEFT names linked through ``current``, no temporary anywhere."""
    for name in NAMES:
        assert os.readlink(d / name) == f"{STATE}/current/{name}", _describe(d)
    state = sorted(os.listdir(d / STATE))
    version = os.readlink(d / STATE / "current")
    assert state == sorted(["current", "lock", version]), _describe(d)
    assert sorted(os.listdir(d / STATE / version)) == sorted(NAMES)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")], _describe(d)


def _normalized(d):
    """``tree(d)`` with version names replaced by ``v``: two clean saves give equal results."""
    out = {}
    for k, v in tree(d).items():
        out[_VERSION.sub("v", k)] = _VERSION.sub("v", v) if isinstance(v, str) else v
    return out


_VERSION = re.compile(r"v-\d+-[0-9a-f]+")


def _fault_free(template, tmp, refs):
    """The directory after saving ``new`` then ``new2`` with no fault: what every recovery must end as."""
    d = _fresh(template, tmp / "fault_free")
    with Injector(sync=False) as inj:
        ck.write_checkpoint(d, refs["new"].tensors, refs["new"].config)
    assert pair(d) == refs["new"].pair
    with Injector(sync=False):
        ck.write_checkpoint(d, refs["new2"].tensors, refs["new2"].config)
    return inj.count, inj.log, _normalized(d), d


def _recover(d, refs, checker, expected, what):
    """The next save succeeds, removes every leftover and leaves other files alone."""
    new2 = refs["new2"]
    with Injector(sync=False):
        ck.write_checkpoint(d, new2.tensors, new2.config)
    checker.check(d, {new2.pair}, what + ", then a clean save")
    got = _normalized(d)
    left = sorted(set(got) - set(expected))
    assert got == expected, f"{what}, then a clean save: left {left}, differs in " \
                            f"{sorted(k for k in expected if got.get(k) != expected[k])}"


def _report(problems, runs):
    assert not problems, f"{len(problems)} of {runs} runs failed:\n" + "\n".join(problems[:25])


def _first_line(exc):
    return str(exc).splitlines()[0][:400] if str(exc) else repr(exc)


# --------------------------------------------------------------------------- an exception at every operation
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_exception_at_every_operation(tmp_path, refs, templates, scenario):
    template, old = templates[scenario]
    new = refs["new"]
    n, log, expected, clean = _fault_free(template, tmp_path, refs)
    assert n >= 5, log  # sanity: the counter sees the save
    checker = Checker(refs)
    runs, problems = 0, []
    for k in range(1, n + 1):
        for action, torn in (("raise", False), ("raise_all", False), ("raise", True)):
            if torn and log[k - 1] not in ("write", "save_file"):
                continue
            what = f"{scenario}: {action}{' torn' if torn else ''} at operation {k}/{n} ({log[k - 1]})"
            d = _fresh(template, tmp_path / "d")
            raised = False
            runs += 1
            try:
                with Injector(at=k, action=action, torn=torn, sync=False):
                    try:
                        ck.write_checkpoint(d, new.tensors, new.config)
                    except Injected:
                        raised = True
                checker.check(d, {old, new.pair} if raised else {new.pair}, what)
                _recover(d, refs, checker, expected, what)
            except AssertionError as exc:
                problems.append(_first_line(exc))
    _report(problems, runs)
    assert_clean_layout(clean)
    print(f"{scenario}: {n} operations, {runs} injected failures, {checker.loads} layouts loaded with both loaders")


# --------------------------------------------------------------------------- SIGKILL at every operation
class Worker:
    """The fork server of crash_worker.py: one request, one reply, each bounded in time."""

    def __init__(self, tmp):
        self.err = open(tmp / "worker.stderr", "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, cwd=Path(__file__).parent)
        self.buf = b""
        assert self._reply(120).get("ready")

    def _reply(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"worker did not answer in {timeout} s; stderr: {self._stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"worker exited; stderr: {self._stderr()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _stderr(self):
        self.err.seek(0)
        return self.err.read()[-3000:]

    def __call__(self, timeout=60, **req):
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._reply(timeout)

    def close(self):
        try:
            self.proc.stdin.write(b'{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.err.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("worker"))
    yield w
    w.close()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sigkill_at_every_operation(tmp_path, refs, templates, worker, scenario):
    """A real process SIGKILLed before each file operation of its save (and in the middle of each write)."""
    template, old = templates[scenario]
    new = refs["new"]
    d = _fresh(template, tmp_path / "d")
    done = worker(cmd="save", dir=str(d), ref=new.prefix)
    assert done["code"] == 0 and pair(d) == new.pair, done
    n, log = done["ops"], done["log"]
    _, _, expected, clean = _fault_free(template, tmp_path, refs)
    checker = Checker(refs)
    kills, runs, problems = 0, 0, []
    for k in range(1, n + 2):  # n + 1: nothing to kill, the save completes
        for torn in (False, True):
            if torn and (k > n or log[k - 1] not in ("write", "save_file")):
                continue
            what = f"{scenario}: SIGKILL{' mid-write' if torn else ''} at operation {k}/{n} ({log[min(k, n) - 1]})"
            d = _fresh(template, tmp_path / "d")
            res = worker(cmd="save", dir=str(d), ref=new.prefix, kill_at=k, torn=torn, sync=False)
            runs += 1
            if k <= n:
                assert res["signal"] == 9, (what, res)
                kills += 1
            else:
                assert res["code"] == 0, (what, res)
            try:
                checker.check(d, {old, new.pair} if k <= n else {new.pair}, what)
                _recover(d, refs, checker, expected, what)
            except AssertionError as exc:
                problems.append(_first_line(exc))
    _report(problems, runs)
    assert_clean_layout(clean)
    print(f"{scenario}: {n} operations, {kills} processes killed, {checker.loads} layouts loaded with both loaders")


# --------------------------------------------------------------------------- kill -9 at random moments, large files
N_KILLS = 30
WIDTH, RANK, LAYERS = 2048, 512, 4  # 8 MB of adapter tensors per layer at full rank


def _big_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    base = _big_model()
    am = fastadalora.get_adalora_model(copy.deepcopy(base), fastadalora.AdaLoraConfig(
        init_r=RANK, target_r=RANK // 4, total_step=10, target_modules=[str(i) for i in range(LAYERS)]))
    layers = am.adapter_layers()
    out = []
    for k, keep in enumerate((RANK, RANK - 64, RANK - 128)):  # three rank patterns: ~32, 28 and 24 MB
        with torch.no_grad():
            for i, layer in enumerate(layers.values()):
                layer.lora_E.fill_(0.1 * (k + 1) + i)
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(10 * k + i))
        masks = {p: [j < keep for j in range(RANK)] for p in layers}
        tensors = peft_format.adapter_tensors(layers, masks, {})
        config = peft_format.config_dict(am.adalora_config, am.model, layers, {}, masks)
        out.append(Ref(root, f"big{k}", tensors, config))
    return base, out


def _load_big(d, base, ref):
    am = fastadalora.AdaLoraModel.from_pretrained(copy.deepcopy(base), d)
    got = peft_format.adapter_tensors(am.adapter_layers(), am.live_masks(), {})
    assert got.keys() == ref.tensors.keys() and all(torch.equal(got[k], ref.tensors[k]) for k in got)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), d)
    got = peft.get_peft_model_state_dict(pm)
    assert got.keys() == ref.tensors.keys() and all(torch.equal(got[k], ref.tensors[k]) for k in got)


def test_random_kill9_during_large_saves(tmp_path, big, worker):
    """kill -9 at random moments while a process saves ~30 MB checkpoints back to back, N_KILLS times."""
    base, rs = big
    rng = random.Random(1234)
    size = max(len(r.pair[1]) + len(r.pair[0]) for r in rs)
    assert 20e6 < size < 40e6
    d = tmp_path / "ckpt"
    start = time.monotonic()
    ck.write_checkpoint(d, rs[0].tensors, rs[0].config)
    save_s = time.monotonic() - start  # only to spread the kills over a save; nothing asserts a duration
    _extras(d)
    held = 0  # index of the reference the directory holds
    outcomes = {"old": 0, "new": 0, "leftovers": 0}
    progress = tmp_path / "progress"
    for round_ in range(N_KILLS):
        seq = [(held + 1 + j) % 3 for j in range(3)]  # the child saves these in turn, starting with another one
        child = worker(cmd="loop", dir=str(d), refs=[rs[i].prefix for i in seq], progress=str(progress))["pid"]
        time.sleep(rng.uniform(0.0, 5.0 * save_s))
        os.kill(child, 9)
        res = worker(cmd="wait", pid=child)
        assert res["signal"] == 9, res
        text = progress.read_text().strip() if progress.exists() else ""
        done = int(text) if text else 0  # saves the child completed (and recorded)
        before = held if done == 0 else seq[(done - 1) % 3]
        after = seq[done % 3]
        now = pair(d)
        assert now in (rs[before].pair, rs[after].pair), \
            f"round {round_}: neither the old nor the new checkpoint: {_describe(d)}"
        outcomes["old" if now == rs[before].pair else "new"] += 1
        held = before if now == rs[before].pair else after
        _load_big(d, base, rs[held])
        for rel, data in EXTRAS.items():
            assert (d / rel).read_bytes() == data
        # no growth: what killed saves leave is removed by the next one (at most the live version and one partial)
        extras = sum(len(v) for v in EXTRAS.values())
        left = disk_bytes(d) - extras - len(now[0]) - len(now[1])  # what the killed save left
        assert left <= size + 65536, f"round {round_}: {_describe(d)}"
        outcomes["leftovers"] += left > 0
        if progress.exists():
            progress.unlink()
    ck.write_checkpoint(d, rs[(held + 1) % 3].tensors, rs[(held + 1) % 3].config)
    assert pair(d) == rs[(held + 1) % 3].pair
    assert_clean_layout(d)
    assert disk_bytes(d) - sum(len(v) for v in EXTRAS.values()) <= size
    print(f"{N_KILLS} kills during {size / 1e6:.0f} MB saves (one save ~{save_s:.2f} s): "
          f"{outcomes['old']} left the old checkpoint, {outcomes['new']} the new one, all loadable; "
          f"{outcomes['leftovers']} left files the next save removed")


# --------------------------------------------------------------------------- concurrent savers
def _layout_keys(refs, tmp):
    """The paths a clean save leaves (version names normalized)."""
    d = tmp / "clean"
    ck.write_checkpoint(d, refs["old"].tensors, refs["old"].config)
    return set(_normalized(d))


def _race_rounds(tmp_path, refs, race, rounds: int = 30) -> None:
    """``race(d)`` saves old and new concurrently into ``d``; after every round ``d`` holds one of the two
    whole, with nothing left over; finally it loads."""
    a, b = refs["old"], refs["new"]
    d = tmp_path / "ckpt"
    expected = _layout_keys(refs, tmp_path)
    mixed, leftovers = [], []
    for round_ in range(rounds):
        race(d)
        if pair(d) not in (a.pair, b.pair):
            mixed.append(round_)
        if set(_normalized(d)) != expected:
            leftovers.append(sorted(set(_normalized(d)) - expected))
    assert not mixed, f"{len(mixed)} of {rounds} rounds left a mixed checkpoint"
    assert not leftovers, leftovers
    assert_clean_layout(d)
    _loads(d, a.tensors if pair(d) == a.pair else b.tensors)


def test_two_threads_saving_into_one_directory(tmp_path, refs):
    a, b = refs["old"], refs["new"]

    def race(d):
        barrier, errors = threading.Barrier(2, timeout=60), []

        def save(r):
            try:
                barrier.wait()
                ck.write_checkpoint(d, r.tensors, r.config)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(r,)) for r in (a, b)]
        with Injector(delay=0.002):  # a slow, jittery filesystem: the savers interleave
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and not errors, errors

    _race_rounds(tmp_path, refs, race)


def test_two_processes_saving_into_one_directory(tmp_path, refs, worker):
    a, b = refs["old"], refs["new"]

    def race(d):
        res = worker(cmd="race", dir=str(d), refs=[a.prefix, b.prefix], delay=0.002, saves=1, timeout=120)
        assert all(r["code"] == 0 for r in res["results"]), (res, worker._stderr())

    _race_rounds(tmp_path, refs, race)


# --------------------------------------------------------------------------- fallbacks
def _failing(code: int):
    """A stand-in for an OS call that a filesystem does not support: it raises ``OSError(code)``."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_without_symlinks_plain_files_and_leftovers_removed(tmp_path, refs, monkeypatch):
    """A filesystem without symlinks: plain files as before, and temporaries of killed saves still removed."""
    d = tmp_path / "ckpt"
    _plain(d, refs["old"].pair)
    stale = d / ".adapter_model.safetensors.4242.0badf00d.tmp"
    stale.write_bytes(b"x" * 1000)
    monkeypatch.setattr(os, "symlink", _failing(errno.EPERM))
    ck.write_checkpoint(d, refs["new"].tensors, refs["new"].config)
    monkeypatch.undo()
    assert pair(d) == refs["new"].pair
    assert not any(os.path.islink(d / n) for n in NAMES)
    assert not stale.exists()
    _loads(d, refs["new"].tensors)


def test_conversion_copies_where_hard_links_fail(tmp_path, refs, monkeypatch):
    d = tmp_path / "ckpt"
    shutil.copytree(refs["peft_dir"], d)
    real_link = os.link
    monkeypatch.setattr(os, "link", _failing(errno.EPERM))
    with Injector(at=None) as inj:  # count: the conversion copies instead
        ck.write_checkpoint(d, refs["new"].tensors, refs["new"].config)
    monkeypatch.undo()
    assert os.link is real_link and "copyfile" in inj.log
    assert pair(d) == refs["new"].pair
    assert_clean_layout(d)
    _loads(d, refs["new"].tensors)


def test_without_flock_saves_stay_atomic(tmp_path, refs, monkeypatch):
    """A filesystem whose flock fails (ENOLCK, as on some network mounts): still one atomic swap per save."""
    import fcntl

    d = tmp_path / "ckpt"
    ck.write_checkpoint(d, refs["old"].tensors, refs["old"].config)
    monkeypatch.setattr(fcntl, "flock", _failing(errno.ENOLCK))
    ck.write_checkpoint(d, refs["new"].tensors, refs["new"].config)
    monkeypatch.undo()
    assert pair(d) == refs["new"].pair
    assert_clean_layout(d)  # the replaced version is removed even without the lock


def test_child_forked_during_a_save_does_not_keep_the_lock(tmp_path, refs):
    """A process forked while a thread saves (a DataLoader worker, say) must not hold the lock after the save."""
    import fcntl

    from fastadalora.checkpoint import files

    d = tmp_path / "ckpt"
    ck.write_checkpoint(d, refs["old"].tensors, refs["old"].config)
    child = None
    rfd, wfd = os.pipe()
    try:
        with files._locked(d / STATE):
            child = os.fork()
            if child == 0:  # pragma: no cover - the child says it runs (fork hooks done), then waits to be killed
                os.write(wfd, b"1")
                time.sleep(60)
                os._exit(0)
        ready = select.select([rfd], [], [], 60)[0]
        assert ready and os.read(rfd, 1) == b"1"
        fd = os.open(d / STATE / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the child held it
        finally:
            os.close(fd)
    finally:
        os.close(rfd)
        os.close(wfd)
        if child:
            os.kill(child, 9)
            os.waitpid(child, 0)
    ck.write_checkpoint(d, refs["new"].tensors, refs["new"].config)
    assert pair(d) == refs["new"].pair


def test_loading_while_another_thread_saves_reads_one_version(tmp_path, refs, monkeypatch):
    """A load during a concurrent save reads the config and the weights of one and the same version."""
    a, b = refs["old"], refs["new"]
    d = tmp_path / "ckpt"
    ck.write_checkpoint(d, a.tensors, a.config)
    stop, errors = threading.Event(), []
    read_config = ck.files.read_adapter_config

    def slow_read_config(directory):  # a save completes between the two reads
        config = read_config(directory)
        time.sleep(0.03)
        return config

    monkeypatch.setattr(ck.files, "read_adapter_config", slow_read_config)

    def saver():
        try:
            i = 0
            while not stop.wait(0.05):
                r = (a, b)[i % 2]
                ck.write_checkpoint(d, r.tensors, r.config)
                i += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=saver)
    with Injector(delay=0.0005):  # a slow filesystem: the reads and the switches interleave
        thread.start()
        try:
            for _ in range(25):
                config, tensors = ck.read_checkpoint(d)
                pairs = [(r.config["rank_pattern"], {k: t.shape for k, t in r.tensors.items()}) for r in (a, b)]
                assert (config["rank_pattern"], {k: t.shape for k, t in tensors.items()}) in pairs
        finally:
            stop.set()
            thread.join(timeout=120)
    assert not errors, errors
