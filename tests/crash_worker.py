"""Fault injection for checkpoint saves (used by tests/test_checkpoint_crash.py).

* ``Injector``: counts the file operations a save performs (the ``os``/``fcntl``/``shutil``/safetensors
  functions in ``OPS``) and, at the k-th, raises, tears the write and raises, or SIGKILLs the process.
* ``pair`` / ``tree``: what a directory holds, read through its symlinks / as laid out on disk.
* Run as a script it is a small fork server: it imports torch and fastadalora once, then forks a
  child per request, so every "kill at the k-th operation" and every random ``kill -9`` hits a
  real, separate process without paying Python's start-up each time.  Requests and replies are
  one JSON object per line on stdin / stdout.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import time

import shutil

import safetensors.torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock to count
    fcntl = None

# (module, function) pairs that touch the filesystem in a save; reads such as stat/readlink/scandir are not counted
OPS = [(os, "open"), (os, "write"), (os, "fsync"), (os, "mkdir"), (os, "link"), (os, "symlink"), (os, "replace"),
       (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (os, "chmod"), (shutil, "copyfile"),
       (safetensors.torch, "save_file")] + ([(fcntl, "flock")] if fcntl is not None else [])
WRITES = ("write", "save_file")


class Injected(OSError):
    pass


def _die():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - the signal is delivered before this returns


def _no_fsync(fd):
    os.fstat(fd)  # still fails on a bad descriptor, like fsync


class Injector:
    """Patch ``OPS``; at operation number ``at`` (1-based) do ``action``.

    action: "raise" (raise before the operation, later ones run), "raise_all" (this one and every later
    one raise: a disk gone away, so no clean-up can run either), "kill" (SIGKILL before the operation).
    ``torn``: when the k-th operation is a write, first write half of it (then raise or kill).
    ``delay``: up to this many seconds (random) slept before every operation: a slow, jittery filesystem
    that widens race windows and lets concurrent savers drift out of step (nothing asserts a time).
    ``sync=False``: ``fsync`` is counted (and can fail) but does not reach the disk.  A killed process
    loses nothing that fsync would have saved (the page cache survives it); this only keeps hundreds
    of saves fast on a busy disk.  Power loss is out of reach of these tests either way.
    """

    def __init__(self, at=None, action="raise", torn=False, delay=0.0, sync=True):
        self.at, self.action, self.torn, self.delay, self.sync = at, action, torn, delay, sync
        self.count = 0
        self.log = []
        self._rng = random.Random()  # seeded from the OS: forked savers drift differently
        self._saved = []

    def __enter__(self):
        for mod, name in OPS:
            real = getattr(mod, name)
            self._saved.append((mod, name, real))
            setattr(mod, name, self._wrap(name, real if self.sync or name != "fsync" else _no_fsync))
        return self

    def __exit__(self, *exc):
        for mod, name, real in reversed(self._saved):
            setattr(mod, name, real)
        self._saved.clear()
        return False

    def _fail(self, name):
        if self.action == "kill":
            _die()
        raise Injected(errno.EIO, f"injected failure at operation {self.count} ({name})")

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            if self.delay:
                time.sleep(self._rng.uniform(0.0, self.delay))
            self.count += 1
            self.log.append(name)
            hit = self.at is not None and (self.count == self.at
                                           or (self.action == "raise_all" and self.count > self.at))
            if not hit:
                return real(*args, **kwargs)
            if self.torn and self.count == self.at and name in WRITES:
                if name == "save_file":
                    real(*args, **kwargs)
                    path = args[1]
                    with open(path, "r+b") as fh:
                        fh.truncate(os.path.getsize(path) // 2)
                else:
                    fd, data = args
                    real(fd, bytes(data)[: max(1, len(data) // 2)])
            self._fail(name)

        return op


# --------------------------------------------------------------------------- what a directory holds
NAMES = ("adapter_config.json", "adapter_model.safetensors")


def pair(d):
    """``(config bytes, weights bytes)`` read through the names PEFT opens; None for a name that does not resolve."""
    out = []
    for name in NAMES:
        p = os.path.join(d, name)
        out.append(open(p, "rb").read() if os.path.isfile(p) else None)
    return tuple(out)


def tree(d, rel=""):
    """``{relative path: bytes | "-> target" | "<dir>"}`` of everything under ``d`` (symlinks not followed)."""
    out = {}
    for name in sorted(os.listdir(os.path.join(d, rel) if rel else d)):
        r = f"{rel}/{name}" if rel else name
        p = os.path.join(d, r)
        if os.path.islink(p):
            out[r] = "-> " + os.readlink(p)
        elif os.path.isdir(p):
            out[r] = "<dir>"
            out.update(tree(d, r))
        else:
            with open(p, "rb") as fh:
                out[r] = fh.read()
    return out


def disk_bytes(d):
    """Bytes of the regular files under ``d`` (symlinks not followed)."""
    total = 0
    for root, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def load_ref(prefix):
    """A checkpoint's ``(tensors, config)`` from ``prefix.safetensors`` / ``prefix.json``."""
    with open(prefix + ".safetensors", "rb") as fh:
        tensors = safetensors.torch.load(fh.read())
    with open(prefix + ".json") as fh:
        config = json.load(fh)
    return tensors, config


# --------------------------------------------------------------------------- fork server
def _child(fn):
    """Fork; the child runs ``fn`` and exits (never returns into the server loop)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException as exc:
            sys.stderr.write(f"child {os.getpid()}: {exc!r}\n")
        finally:
            os._exit(code)
    return pid


def _status(pid):
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "code": None}
    return {"signal": None, "code": os.WEXITSTATUS(status)}


def serve():
    import torch

    torch.set_num_threads(1)
    from fastadalora.checkpoint import files

    refs = {}

    def ref(prefix):
        if prefix not in refs:
            refs[prefix] = load_ref(prefix)
        return refs[prefix]

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        if cmd == "save":  # one save, optionally killed at the k-th operation; reply: how it ended, ops counted
            tensors, config = ref(req["ref"])
            rfd, wfd = os.pipe()

            def save():
                os.close(rfd)
                with Injector(at=req.get("kill_at"), action="kill", torn=req.get("torn", False),
                              sync=req.get("sync", True)) as inj:
                    files.write_checkpoint(req["dir"], tensors, config)
                os.write(wfd, json.dumps({"ops": inj.count, "log": inj.log}).encode())

            pid = _child(save)
            os.close(wfd)
            data = b""
            while chunk := os.read(rfd, 65536):
                data += chunk
            os.close(rfd)
            reply({**_status(pid), **(json.loads(data) if data else {})})
        elif cmd == "loop":  # save the refs in turn, forever; record the number of completed saves
            loaded = [ref(p) for p in req["refs"]]
            progress = req["progress"]

            def loop():
                fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                i = 0
                while True:
                    files.write_checkpoint(req["dir"], *loaded[i % len(loaded)])
                    i += 1
                    os.pwrite(fd, f"{i:12d}".encode(), 0)

            reply({"pid": _child(loop)})
        elif cmd == "wait":
            reply(_status(req["pid"]))
        elif cmd == "race":  # two processes save different refs into one directory at once
            loaded = [ref(p) for p in req["refs"]]
            rfd, wfd = os.pipe()

            def racer(k):
                def run():
                    os.close(wfd)
                    os.read(rfd, 1)  # the start signal
                    with Injector(delay=req.get("delay", 0.0)):
                        for _ in range(req.get("saves", 1)):
                            files.write_checkpoint(req["dir"], *loaded[k])
                return run

            pids = [_child(racer(k)) for k in range(len(loaded))]
            os.close(rfd)
            os.write(wfd, b"go" * len(pids))
            os.close(wfd)
            reply({"results": [_status(p) for p in pids]})
        else:
            reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    serve()
