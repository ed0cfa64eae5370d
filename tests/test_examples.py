"""The examples run as a user would run them, and check their own results."""
import os
import re
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


def _needs(module):
    """The examples' data sets come from the `examples` extra; CI installs it and sets
    CYLSTM_REQUIRE_EXAMPLES so that a missing package fails instead of skipping."""
    if os.environ.get("CYLSTM_REQUIRE_EXAMPLES"):
        __import__(module)
    else:
        pytest.importorskip(module)


def _run(name, *args):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cylstm.__file__)))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_digits_example_reaches_its_stated_accuracy():
    _needs("sklearn")
    out = _run("digits.py", "--verbose", "0")
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert acc >= 0.96, out


def test_sunspots_example_beats_persistence_and_is_near_ar9():
    _needs("statsmodels")
    out = _run("sunspots.py")
    m = re.search(r"LSTM ([0-9.]+)\s+persistence ([0-9.]+)\s+AR\(9\) ([0-9.]+)", out)
    lstm, persistence, ar9 = map(float, m.groups())
    assert abs(persistence - 25.26) < 0.01 and abs(ar9 - 13.75) < 0.01     # the baselines
    assert lstm < persistence and lstm < 1.15 * ar9, out


def test_char_lm_example_reports_bits_per_character_per_epoch():
    out = _run("char_lm.py", "--epochs", "2", "--max-chars", "40000", "--hidden-size", "64")
    bpc = [float(v) for v in re.findall(r"val_bpc ([0-9.]+)", out)]   # a line per epoch
    assert len(bpc) == 2 and bpc[1] < bpc[0] < 7, out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert out.splitlines()[-1].startswith("The ") or "The " in out


# Runs the script in argv[1] as __main__ with Python's own Ctrl-C handling. A process
# inherits an ignored or blocked SIGINT through exec, and Python then installs no
# KeyboardInterrupt handler: a pytest started as a background job of a non-interactive
# shell (`pytest ... &`: SIGINT ignored) passes that on, and the example would run to
# the end, ignoring the test's Ctrl-C.
_WITH_CTRL_C = ("import runpy, signal, sys; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _ctrl_c(name, args, ready):
    """Run an example, press Ctrl-C once it prints a line ``ready(line)`` accepts, and
    return its stdout; it must exit 0 with no traceback."""
    import signal
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cylstm.__file__)))
    proc = subprocess.Popen([sys.executable, "-u", "-c", _WITH_CTRL_C,
                             os.path.join(ROOT, "examples", name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()          # ended before it was ready
            if ready(line):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return out


def test_char_lm_example_stops_cleanly_on_ctrl_c():
    # Ctrl-C once the first epoch's line shows (training under way in epoch 2).
    out = _ctrl_c("char_lm.py", ["--epochs", "50", "--max-chars", "20000",
                                 "--hidden-size", "64"],
                  lambda line: line.startswith("Epoch 1/50"))
    assert "interrupted" in out and "\nThe " in out.split("interrupted")[1], out


def test_regularisation_example_generalises_better_with_recurrent_dropout():
    _needs("sklearn")
    out = _run("regularisation.py", "--seeds", "3", "--verbose", "0")
    # table rows: seed, model, epochs, train loss, best val loss, ...
    rows = re.findall(r"^\s*(\d)\s+(none|rd=0\.5 wd=0)\s+\d+\s+[0-9.]+\s+([0-9.]+)", out, re.M)
    best = {(int(seed), name): float(loss) for seed, name, loss in rows}
    assert len(best) == 6, out
    # Measured gaps in best validation loss: 0.28, 0.27, 0.10 for seeds 0, 1, 2. Every
    # seed must clear 0.05, and the mean 0.15: the effect, not one lucky seed.
    gaps = [best[s, "none"] - best[s, "rd=0.5 wd=0"] for s in range(3)]
    assert min(gaps) > 0.05 and sum(gaps) / 3 > 0.15, out


def test_regularisation_example_stops_cleanly_on_ctrl_c():
    _needs("sklearn")
    # Ctrl-C once seed 0's first model has finished (its summary line), so that one run
    # is complete and the next is under way.
    out = _ctrl_c("regularisation.py", ["--seeds", "3"], lambda line: "best val loss" in line)
    # the finished run is in the table, and the comparison is not claimed without a pair
    assert "interrupted" in out and re.search(r"^\s*0\s+none\s+\d+", out, re.M), out
