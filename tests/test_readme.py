"""The README's Python examples run as written (the ones that need no torch)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # the examples write model files
    blocks = [b for b in _python_blocks() if b.lstrip().startswith("import numpy")]
    assert len(blocks) >= 2                  # the API example and the training one
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
