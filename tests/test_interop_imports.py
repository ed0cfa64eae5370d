"""The optional interop packages stay optional: ``import cylstm`` (and importing its
cylstm.onnx and cylstm.keras modules) loads neither onnx, onnxruntime nor keras; their
functions import them when called. Runs without any extra installed."""
import os
import subprocess
import sys


def test_import_cylstm_imports_neither_onnx_nor_keras():
    code = ("import sys, cylstm; import cylstm.onnx, cylstm.keras; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))


def test_cylstm_onnx_without_onnx_says_how_to_install(tmp_path):
    # a stand-in onnx package that cannot be imported, first on the path
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "__init__.py").write_text("raise ImportError('no onnx here')\n")
    code = ("import cylstm, cylstm.onnx\n"
            "try:\n"
            "    cylstm.onnx.export(cylstm.LSTM(2, 3), 'x.onnx')\n"
            "except ImportError as e:\n"
            "    assert 'pip install' in str(e) and 'cylstm[onnx]' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=env)
