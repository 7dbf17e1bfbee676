"""Reading and writing an adapter directory: safetensors and JSON only, never a pickle.

Layout of a directory written by :func:`write_checkpoint` (POSIX)::

    <dir>/adapter_model.safetensors -> .fastadalora/current/adapter_model.safetensors
    <dir>/adapter_config.json       -> .fastadalora/current/adapter_config.json
    <dir>/.fastadalora/current      -> v-<pid>-<random>        (the one live version)
    <dir>/.fastadalora/v-<pid>-<random>/adapter_model.safetensors, adapter_config.json
    <dir>/.fastadalora/lock                                    (flock: one saver at a time)

The two names PEFT opens are fixed relative symlinks, so ``peft.PeftModel.from_pretrained`` (and
anything else that opens them) reads the pair that ``current`` names.  A save writes and fsyncs a
complete new version directory, then replaces ``current`` with ``os.replace`` (one atomic rename)
and fsyncs: at every instant, and after a crash at any instant, the names resolve to the previous
pair or to the new one, never to a mix.  Concurrent savers (threads or processes) are serialized by
``flock`` on ``.fastadalora/lock`` (released by the kernel when a process dies); under that lock
each save first removes what interrupted saves left (unreferenced versions, temporary links,
temporary files of older fastadalora versions).  Other files in the directory are never touched.

A directory holding plain files (saved by PEFT or by an older fastadalora) is converted in
crash-safe steps: the existing pair is hard-linked (or copied) into a version directory,
``current`` is pointed at it, and only then is each plain file replaced by its symlink, so every
intermediate state resolves to the same, unchanged pair.

Fallback: where ``fcntl``/symlinks are unavailable (Windows, a filesystem without symlinks) the
files are written as plain files to temporary names and renamed into place, weights then config;
a failure mid-save leaves the previous files intact, but a crash between the two renames can pair
new weights with the old config.  Where ``flock`` itself is unsupported (some network filesystems)
saves stay crash-safe, but concurrent saves are not serialized and leftovers of killed saves are
not removed.

Copying: ``cp -a`` / ``shutil.copytree(..., symlinks=True)`` keep the layout; a copy that follows
symlinks holds plain files (plus a duplicate under ``.fastadalora``), which still loads and is
converted back by the next save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import safetensors
import safetensors.torch
import torch

from .peft_format import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, CheckpointNotFoundError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

STATE_DIR = ".fastadalora"
_CURRENT = "current"
_LOCK = "lock"
_NAMES = (WEIGHTS_NAME, CONFIG_NAME)  # weights first, config last: a fresh directory looks like an adapter last
# temporary names next to the PEFT files: ".<name>.<pid>.<hex>.tmp" (also what older fastadalora versions left)
_TOP_TMP = re.compile(r"^\.(?:adapter_model\.safetensors|adapter_config\.json)\.\d+\.[0-9a-f]+\.tmp$")
_VERSION = re.compile(r"^v-\d+-[0-9a-f]+$")
# errno values meaning "this filesystem / OS cannot do that" (symlink, flock, directory fsync)
_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOLCK}


# --------------------------------------------------------------------------- small file operations
def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries durable (renames, new links)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:  # Windows cannot open a directory; a directory we may not read
        if os.name == "nt" or exc.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystems that cannot fsync a directory
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _tmp_path(directory: Path, name: str) -> Path:
    """A new, empty file next to ``name`` (same filesystem, so ``os.replace`` is atomic), mode 0666 & ~umask."""
    for _ in range(100):
        tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file in {directory}")  # pragma: no cover


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` with mode 0666 & ~umask (safetensors alone writes 0600), fsynced."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = path.stat().st_mode & 0o777
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)
    _fsync_file(path)


def _write_json(obj: dict, path: Path) -> None:
    data = memoryview((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, a symlink or a directory tree (never following symlinks)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_quietly(path: Path) -> None:
    """Best effort: what is left is removed by the next save."""
    try:
        _remove(path)
    except OSError:
        pass


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the file ``src`` resolves to: a hard link, or a copy where links are impossible."""
    try:
        os.link(os.path.realpath(src), dst)  # the file itself, also when src is a symlink
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED | {errno.EXDEV, errno.EMLINK}:
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        shutil.copyfile(src, dst)
        _fsync_file(dst)


def _swap_symlink(parent: Path, name: str, target: str) -> None:
    """Atomically make ``parent/name`` a symlink to ``target`` (new link under a temporary name, renamed over)."""
    tmp = parent / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, parent / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _link_target(name: str) -> str:
    return f"{STATE_DIR}/{_CURRENT}/{name}"


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # missing, or not a symlink
        return None


def _current_version(state: Path) -> str | None:
    """The version directory ``current`` names, when it is one of ours."""
    target = _readlink(state / _CURRENT)
    return target if target is not None and _VERSION.match(target) else None


def _referenced_versions(directory: Path, state: Path) -> set[str]:
    """Version directories something points at: ``current``, and the PEFT names when they link a version directly."""
    refs = {_current_version(state)}
    for name in _NAMES:
        target = _readlink(directory / name)
        if target is not None:
            parts = target.split("/")
            if len(parts) == 3 and parts[0] == STATE_DIR and _VERSION.match(parts[1]):
                refs.add(parts[1])
    return {r for r in refs if r}


def _is_canonical(directory: Path, state: Path) -> bool:
    return (_current_version(state) is not None
            and all(_readlink(directory / name) == _link_target(name) for name in _NAMES))


def _new_version(state: Path) -> Path:
    for _ in range(100):
        version = state / f"v-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            os.mkdir(version, 0o777)
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue
        return version
    raise FileExistsError(f"could not create a version directory in {state}")  # pragma: no cover


# --------------------------------------------------------------------------- the lock and the clean-up
_HELD_LOCKS: set[int] = set()  # lock descriptors open in this process


def _close_inherited_locks() -> None:
    """In a child forked while a thread saved: drop the inherited descriptor, or the child would hold the lock."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[bool]:
    """Hold ``flock(LOCK_EX)`` on ``state/lock``; yields False where the filesystem does not support flock.

    The kernel releases the lock when the descriptor is closed, also when the process dies.
    """
    fd = os.open(state / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            locked = False
        yield locked
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # releases the lock


def _clean(directory: Path, state: Path) -> None:
    """Remove what interrupted saves left: unreferenced versions and temporaries (only under the lock).

    Best effort: something that cannot be removed does not stop the save.
    """
    for entry in os.scandir(directory):
        if _TOP_TMP.match(entry.name) and not entry.is_dir(follow_symlinks=False):
            _remove_quietly(Path(entry.path))
    keep = {_LOCK, _CURRENT} | _referenced_versions(directory, state)
    for entry in os.scandir(state):
        if entry.name not in keep:
            _remove_quietly(Path(entry.path))


def _symlinks_work(state: Path) -> bool:
    probe = state / f".probe-{secrets.token_hex(4)}"
    try:
        os.symlink("probe", probe)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    os.unlink(probe)
    return True


# --------------------------------------------------------------------------- saving
def _adopt(directory: Path, state: Path) -> None:
    """Bring ``directory`` into the symlink layout without changing what its two PEFT names resolve to.

    Every step keeps each name resolving to the same file (inode) it resolved to before, so a crash
    anywhere leaves the previous checkpoint (or, a name that was missing, still missing).
    """
    for name in _NAMES:
        if (directory / name).is_dir():
            raise ValueError(f"save_pretrained: {directory / name} is a directory")
    version = _new_version(state)
    pointed = False
    try:
        for name in _NAMES:
            if (directory / name).is_file():  # follows symlinks: what a loader reads now
                _link_or_copy(directory / name, version / name)
        _fsync_dir(version)
        _fsync_dir(state)
        current = state / _CURRENT
        if os.path.lexists(current) and not current.is_symlink():
            # ``current`` is a real directory (a copy that followed symlinks): link the names straight
            # to the new version, so nothing resolves through ``current`` while it is replaced
            for name in _NAMES:
                if (directory / name).is_file():
                    _swap_symlink(directory, name, f"{STATE_DIR}/{version.name}/{name}")
                    pointed = True
            _fsync_dir(directory)
            _remove(current)
        _swap_symlink(state, _CURRENT, version.name)
        pointed = True
        _fsync_dir(state)
    except BaseException:
        if not pointed:
            _remove_quietly(version)
        raise
    for name in _NAMES:
        if _readlink(directory / name) != _link_target(name):
            _swap_symlink(directory, name, _link_target(name))
    _fsync_dir(directory)


def _save_version(state: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str | None:
    """Write a complete new version, then point ``current`` at it (the one atomic step); return the old one."""
    version = _new_version(state)
    swapped = False
    try:
        _write_weights(tensors, version / WEIGHTS_NAME)
        _write_json(config, version / CONFIG_NAME)
        _fsync_dir(version)
        _fsync_dir(state)
        old = _current_version(state)
        _swap_symlink(state, _CURRENT, version.name)
        swapped = True
        _fsync_dir(state)
    except BaseException:
        if not swapped:
            _remove_quietly(version)
        raise
    return old if old != version.name else None


def _write_plain(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """The fallback without symlinks: temporary files renamed into place, weights then config."""
    tmp_w = _tmp_path(directory, WEIGHTS_NAME)
    tmp_c = None
    try:
        _write_weights(tensors, tmp_w)
        tmp_c = _tmp_path(directory, CONFIG_NAME)
        _write_json(config, tmp_c)
        os.replace(tmp_w, directory / WEIGHTS_NAME)
        os.replace(tmp_c, directory / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            if tmp is not None and tmp.exists():
                tmp.unlink()
    _fsync_dir(directory)


def _save_directory(save_directory: str | os.PathLike) -> Path:
    """``save_directory`` as a ``Path``, made if missing; a ``ValueError`` if it is something else."""
    directory = Path(save_directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_checkpoint(save_directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     config: dict[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``save_directory``, atomically.

    After a crash at any instant the directory holds the previous checkpoint or this one (see the
    module docstring for the layout and the fallback where symlinks or ``fcntl`` are unavailable).
    """
    directory = _save_directory(save_directory)
    if fcntl is None or not hasattr(os, "symlink"):  # pragma: no cover - Windows
        _write_plain(directory, tensors, config)
        return
    state = directory / STATE_DIR
    if os.path.lexists(state) and not (state.is_dir() and not state.is_symlink()):
        raise ValueError(f"save_pretrained: {state} is not a directory (fastadalora keeps its versions there)")
    with contextlib.suppress(FileExistsError):
        os.mkdir(state, 0o777)
    with _locked(state) as locked:
        if locked:
            _clean(directory, state)
        if not _is_canonical(directory, state):
            if not _symlinks_work(state):
                _write_plain(directory, tensors, config)
                return
            _adopt(directory, state)
        old = _save_version(state, tensors, config)
        if locked:  # the old version, and anything an interrupted conversion left
            _clean(directory, state)
        elif old is not None:  # only what we replaced: another saver may be half-way
            _remove_quietly(state / old)


def write_model_card(save_directory: str | os.PathLike, make_text) -> None:
    """Write ``README.md`` (PEFT's model card) into ``save_directory``: ``make_text(existing text or None)``
    gives the content; the file is replaced atomically."""
    directory = _save_directory(save_directory)
    path = directory / "README.md"
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    text = make_text(existing)
    tmp = _tmp_path(directory, "README.md")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)


# --------------------------------------------------------------------------- loading
def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; ``CheckpointError`` naming the file when it is not valid JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f"No {CONFIG_NAME} in {directory}: not a PEFT/fastadalora adapter directory")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid JSON adapter config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type != "ADALORA":
        raise CheckpointError(f"{path}: peft_type is {peft_type!r}, expected 'ADALORA'")
    return cfg


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The safetensors file as CPU tensors (never unpickles); ``CheckpointError`` naming the file when corrupt."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory} holds only adapter_model.bin (a pickle); fastadalora loads safetensors only. "
                "Re-save it with safe_serialization=True from a trusted environment.")
        raise CheckpointNotFoundError(f"No {WEIGHTS_NAME} in {directory}")
    # read the bytes, then parse: no memory map, so a file replaced or truncated while we read cannot crash us
    data = path.read_bytes()
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupted ({exc})") from exc


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter config, weights)`` of one saved version.

    In our layout both are read from the version ``current`` names, so a save running concurrently
    cannot pair one version's config with the next one's weights; if that version is removed while
    being read (the save after next cleans it up), the newer one is read instead.
    """
    directory = Path(directory)
    state = directory / STATE_DIR
    for _ in range(10):
        version = _current_version(state) if _is_canonical(directory, state) else None
        source = directory if version is None else state / version
        try:
            return read_adapter_config(source), read_adapter_weights(source)
        except CheckpointNotFoundError:
            if version is None or _current_version(state) == version:
                raise
    raise CheckpointError(f"{directory}: the checkpoint kept changing while being read (concurrent saves)")


def push_to_hub(save, repo_id: str, *, commit_message: str | None, commit_description: str | None,
                private: bool | None, token, revision: str | None, create_pr: bool):
    """Upload what ``save(directory)`` writes to the Hugging Face Hub repo ``repo_id`` (made if missing).

    The PEFT files are uploaded (read through their links), not the crash-safety folder ``.fastadalora``.
    Returns ``HfApi.upload_folder``'s commit info.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # pragma: no cover - transformers and peft both bring huggingface_hub
        raise ImportError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from exc
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp, token=token,
                                 commit_message=commit_message or "Upload model",
                                 commit_description=commit_description, revision=revision, create_pr=create_pr,
                                 ignore_patterns=[f"{STATE_DIR}/*", f"*/{STATE_DIR}/*"])
