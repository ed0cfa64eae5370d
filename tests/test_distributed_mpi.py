"""Data-parallel training over MPI: every case runs ``mpiexec -n N python
tests/mpi_train.py CASE DIR`` with a timeout (a hang fails instead of blocking) and
compares with the one-process run of the same seeded float64 model in this process.

Skipped when mpi4py or mpiexec is missing, unless CYLSTM_REQUIRE_DISTRIBUTED is set
(CI sets it: there, these tests must run)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cylstm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_train as M  # noqa: E402

try:
    import mpi4py  # noqa: F401
    MPIEXEC = shutil.which("mpiexec") or shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable))
except ImportError:
    MPIEXEC = None
if os.environ.get("CYLSTM_REQUIRE_DISTRIBUTED") and MPIEXEC is None:
    raise ImportError("CYLSTM_REQUIRE_DISTRIBUTED is set but mpi4py or mpiexec is missing "
                      "(pip install \"cylstm[mpi]\")")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec "
                                                        "(the mpi extra)")

TIMEOUT = 120          # seconds for one mpiexec run: far above the few it takes


def mpirun(n, case, out, *extra, expect_ok=True):
    """Run the case on n ranks; returns (returncode, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(HERE,
                        "mpi_train.py"), case, str(out), *map(str, extra)],
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=str(out))
    took = time.perf_counter() - t0
    text = p.stdout + p.stderr
    if expect_ok:
        assert p.returncode == 0, text
    return p.returncode, text, took


def ranks(out, n):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(n)]


def rel(a, b):
    """The largest weight difference relative to the largest weight."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference():
    model, hist = M.reference()
    return model.flat_params.copy(), hist


@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_ranks_match_one_process(n, reference, tmp_path):
    """Shuffling, ragged lengths, LSTM and Dropout-layer dropout, EarlyStopping and a
    schedule: N ranks with the global batch give one process's weights, to rounding
    (N = 1: bitwise), and every rank holds the same weights and the same history."""
    w1, hist = reference
    mpirun(n, "equiv", tmp_path)
    w = np.load(tmp_path / "equiv-weights.npy")
    results = ranks(tmp_path, n)
    assert len({r["checksum"] for r in results}) == 1
    assert all(r["history"] == results[0]["history"] for r in results)
    assert results[0]["epochs_run"] == len(hist.epoch)
    assert results[0]["saved"] > 0 and all(r["saved"] == 0 for r in results[1:])
    if n == 1:
        np.testing.assert_array_equal(w, w1)
        assert results[0]["history"] == hist.history
    else:
        assert rel(w, w1) <= 1e-10
        for k, v in hist.history.items():
            np.testing.assert_allclose(results[0]["history"][k], v, rtol=1e-10)
    print(f"N={n}: max relative weight difference {rel(w, w1):.3g}")


def test_epochs_run_before_early_stopping(reference):
    # The equivalence above must cover several epochs, and EarlyStopping must act.
    _, hist = reference
    assert 3 <= len(hist.epoch) < M.EPOCHS


def test_same_n_repeats_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    mpirun(3, "equiv", a)
    mpirun(3, "equiv", b)
    np.testing.assert_array_equal(np.load(a / "equiv-weights.npy"),
                                  np.load(b / "equiv-weights.npy"))


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_data_matches_one_process(n, reference, tmp_path):
    w1, _ = reference
    mpirun(n, "sharded", tmp_path)
    assert rel(np.load(tmp_path / "sharded-weights.npy"), w1) <= 1e-10
    assert len({r["checksum"] for r in ranks(tmp_path, n)}) == 1


def test_fit_text_matches_one_process(tmp_path):
    model, hist = M.text_reference()
    mpirun(3, "text", tmp_path)
    w = np.load(tmp_path / "text-weights.npy")
    assert rel(w, model.flat_params) <= 1e-10
    results = ranks(tmp_path, 3)
    assert len({r["checksum"] for r in results}) == 1
    np.testing.assert_allclose(results[0]["history"]["val_loss"], hist.history["val_loss"],
                               rtol=1e-10)


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    _, _, took = mpirun(3, "nan", tmp_path)
    results = ranks(tmp_path, 3)
    assert all(r["error"] and "loss became nan" in r["error"] for r in results)
    assert len({r["step"] for r in results}) == 1
    assert len({r["checksum"] for r in results}) == 1


def test_unseeded_model_starts_from_rank_0(tmp_path):
    mpirun(3, "unseeded", tmp_path)
    assert len({r["checksum"] for r in ranks(tmp_path, 3)}) == 1


def test_recurrent_dropout_across_ranks_is_refused_on_every_rank(tmp_path):
    mpirun(2, "recurrent_dropout", tmp_path)
    assert all("recurrent_dropout" in (r["error"] or "") and "layers[0]" in r["error"]
               for r in ranks(tmp_path, 2))


def test_ranks_holding_different_weights_raise_everywhere(tmp_path):
    mpirun(2, "diverge", tmp_path)
    assert all("ranks hold different weights" in (r["error"] or "")
               for r in ranks(tmp_path, 2))


@pytest.mark.parametrize("case, shown", [("raise", "ValueError: a bad batch on purpose"),
                                          ("interrupt", "KeyboardInterrupt")])
def test_error_on_one_rank_stops_all_with_its_message(case, shown, tmp_path):
    code, text, took = mpirun(3, case, tmp_path, expect_ok=False)
    assert code != 0
    assert "rank 2 of 3 failed" in text and shown in text, text
    # rank 0 saved epoch 1 before the failure in epoch 2; it loads.
    model = cylstm.load(tmp_path / "ckpt-1.npz")
    assert model.optimizer.step_count == -(-M.N_ROWS // M.BATCH)
    assert not (tmp_path / "ckpt-2.npz").exists()
    print(f"{case}: every rank stopped {took:.1f} s after the start")


def test_ctrl_c_to_mpiexec_stops_every_rank(tmp_path):
    """SIGINT to mpiexec (Ctrl-C in a terminal) mid-training: every rank ends within
    seconds, and rank 0's last checkpoint loads."""
    p = subprocess.Popen([MPIEXEC, "-n", "3", sys.executable,
                          os.path.join(HERE, "mpi_train.py"), "forever", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "last.npz").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, _ = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0
    assert took < 30
    assert cylstm.load(tmp_path / "last.npz").optimizer.step_count > 0
    print(f"Ctrl-C: every rank stopped {took:.2f} s after the signal")


def test_killed_run_resumes_bitwise(tmp_path):
    """A rank is killed (SIGKILL) in epoch 2; resuming on 2 ranks from the epoch-1
    checkpoint with initial_epoch=1 ends bitwise where an uninterrupted 2-rank run ends."""
    code, text, _ = mpirun(2, "kill", tmp_path, expect_ok=False)
    assert code != 0
    assert (tmp_path / "ckpt-1.npz").exists()
    mpirun(2, "resume", tmp_path, 1)
    assert ranks(tmp_path, 2)[0]["epochs"] == list(range(1, M.EPOCHS))
    mpirun(2, "plain", tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "resume-weights.npy"),
                                  np.load(tmp_path / "plain-weights.npy"))


def test_cli_trains_across_ranks_and_resumes_bitwise(tmp_path):
    """mpiexec -n 2 python -m cylstm train --distributed mpi: rank 0 alone prints and
    saves; 1 epoch + --resume 1 epoch ends bitwise where --epochs 2 ends."""
    def train(model, epochs, *more):
        cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "cylstm", "train",
               "--distributed", "mpi", "--max-chars", "4000", "--epochs", str(epochs),
               "--batch-size", "8", "--seq-len", "16", "--hidden-size", "16",
               "--embedding-dim", "8", "--num-layers", "2", "--dropout", "0.2",
               "--length", "20", "--model", str(tmp_path / model), *more]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                           cwd=tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout
    out = train("straight.npz", 2)
    assert out.count("--- sample") == 1                # rank 0 alone prints
    assert out.count("validation bits/character") == 1
    train("resumed.npz", 1)
    train("resumed.npz", 1, "--resume")
    a, b = cylstm.load(tmp_path / "straight.npz"), cylstm.load(tmp_path / "resumed.npz")
    assert a.metadata["epochs"] == b.metadata["epochs"] == 2
    np.testing.assert_array_equal(a.flat_params, b.flat_params)


def test_cli_refuses_recurrent_dropout_across_ranks_before_any_work(tmp_path):
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "cylstm", "train", "--distributed",
           "mpi", "--recurrent-dropout", "0.2", "--model", str(tmp_path / "m.npz")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert p.returncode != 0 and "--recurrent-dropout" in p.stderr, p.stdout + p.stderr
    assert "text:" not in p.stdout                       # refused before loading any text
    assert not (tmp_path / "m.npz").exists()
