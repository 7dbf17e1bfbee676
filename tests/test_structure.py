"""Structural rules of the package, checked on its source: one-way data flow, each rule in one place."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "fastadalora").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def _code(path: Path) -> str:
    return path.read_text()


def test_no_torch_private_c_names():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(r"torch\._C\b", _code(p))]
    assert not offenders, offenders


def test_the_module_path_rule_lives_in_targeting_only():
    rule = re.compile(r"""endswith\(\s*["']\.["']\s*\+""")
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if rule.search(_code(p)) and p.name != "targeting.py"]
    assert not offenders, offenders


def test_conv1d_detection_lives_in_targeting_only():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES
                 if "pytorch_utils import Conv1D" in _code(p) and p.name != "targeting.py"]
    assert not offenders, offenders


def test_production_code_does_not_import_the_oracle():
    pattern = re.compile(r"from \.+ import reference\b|from \.+reference import|import fastadalora\.reference")
    allowed = {"reference_path.py"}  # the reference *as a backend* is plain autograd over the oracle
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if pattern.search(_code(p)) and p.name not in allowed]
    assert not offenders, offenders


def test_checkpoint_never_imports_the_model():
    for p in (ROOT / "fastadalora" / "checkpoint").glob("*.py"):
        assert not re.search(r"from \.\.model import|from \.\. import model|fastadalora\.model", _code(p)), p


def test_nothing_below_the_model_knows_the_allocator():
    below = [p for p in SOURCES if p.parent.name in ("layers", "backends", "kernels") or p.name == "functional.py"]
    imports = re.compile(r"^\s*(from|import) [\w.]*(allocator|flat_layout|model)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in below if imports.search(_code(p))]
    assert not offenders, offenders


_KERNELS_PROBE = r"""
import importlib, sys
try:
    from kernels import get_kernel
except ImportError as exc:
    assert "fastadalora.kernels" in str(exc), exc
else:
    raise SystemExit("the top-level name `kernels` resolved to a working package")
import transformers.integrations.hub_kernels  # transformers' version probe of `kernels` still works
import fastadalora.kernels.dropout  # and our kernels import under their real name
print("ok")
"""


def test_kernels_folder_does_not_pose_as_the_kernels_package():
    proc = subprocess.run([sys.executable, "-c", _KERNELS_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_subpackage_is_packaged():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastadalora." + ".".join(p.parent.relative_to(ROOT / "fastadalora").parts) if p.parent != ROOT /
             "fastadalora" else "fastadalora" for p in (ROOT / "fastadalora").rglob("__init__.py")}
    assert found | {"fastadalora.kernels"} == listed
