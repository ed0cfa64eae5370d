"""The examples run as a user would run them, and check their own results."""
import os
import subprocess
import sys

import pytest

import cylstm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needs_torch():
    if os.environ.get("CYLSTM_REQUIRE_TORCH"):
        import torch  # noqa: F401  (CI: a missing torch is an error, not a skip)
    else:
        pytest.importorskip("torch")


def test_from_pytorch_example():
    _needs_torch()
    # the cylstm these tests import (installed, or built in place), not a bare checkout
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cylstm.__file__)))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "from_pytorch.py")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "same outputs after loading the tensors directly: True" in out.stdout
