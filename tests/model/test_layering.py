"""model/ stands alone: importing any of its modules pulls in nothing of the node, its storage or DICOM networking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import model

FORBIDDEN = ("node", "storage", "sqlalchemy", "pynetdicom")
MODULES = sorted(f"model.{p.stem}" for p in Path(model.__file__).parent.glob("*.py") if p.stem != "__init__")


def test_model_modules_are_listed():
    assert {"model.volume", "model.cli", "model.sop_classes", "model.predict"} <= set(MODULES)


def test_model_imports_nothing_from_node_or_storage():
    # Which forbidden modules each import brought in (per module, so a failure names the culprit).
    probe = (
        "import importlib, json, sys\n"
        "pulled = {}\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"    bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "    if bad:\n"
        "        pulled[name] = bad\n"
        "        for m in bad:\n"
        "            del sys.modules[m]\n"
        "print(json.dumps(pulled))\n"
    )
    root = Path(model.__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
