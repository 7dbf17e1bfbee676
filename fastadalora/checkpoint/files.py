"""Reading and writing an adapter directory: safetensors and JSON only, never a pickle.

Writes go to temporary names in the target directory and are moved into place with
``os.replace``: a failure or a kill mid-save leaves the previous files intact.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .peft_format import CONFIG_NAME, WEIGHTS_NAME, CheckpointError


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
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


def _write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    mode = path.stat().st_mode & 0o777  # 0666 & ~umask, from _tmp_path; safetensors writes 0600
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_json(obj: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_checkpoint(save_directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     config: dict[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``save_directory``."""
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
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


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; ``CheckpointError`` naming the file when it is not valid JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: not a PEFT/fastadalora adapter directory")
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
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}")
    # read the bytes, then parse: no memory map, so a file replaced or truncated while we read cannot crash us
    data = path.read_bytes()
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupted ({exc})") from exc
