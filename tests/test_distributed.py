"""cylstm.distributed without mpiexec: optional imports, argument checks, resuming with
initial_epoch (one process), and batch inference over dask arrays (threads, processes,
and a LocalCluster of 2 worker processes bound to 127.0.0.1).

The Dask tests skip when dask is missing, unless CYLSTM_REQUIRE_DISTRIBUTED is set
(CI sets it: there, they must run)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import cylstm
from cylstm.callbacks import LambdaCallback, ModelCheckpoint, StepLR

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_train as M  # noqa: E402

try:
    import dask
    import dask.array as da
    import distributed  # noqa: F401
    HAVE_DASK = True
except ImportError:
    HAVE_DASK = False
if os.environ.get("CYLSTM_REQUIRE_DISTRIBUTED") and not HAVE_DASK:
    raise ImportError("CYLSTM_REQUIRE_DISTRIBUTED is set but dask[distributed] is not "
                      "installed (pip install \"cylstm[dask]\")")
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="needs dask[distributed] (the dask "
                                                      "extra)")


def test_import_cylstm_imports_no_extra():
    code = ("import sys, cylstm; bad = [m for m in ('mpi4py', 'dask', 'distributed') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(HERE))
    assert p.returncode == 0, p.stdout + p.stderr


# ---- arguments --------------------------------------------------------------------------

def test_bad_distributed_arguments_name_the_argument():
    x, y, lengths, _ = M.data()
    model = M.build()
    with pytest.raises(ValueError, match="distributed must be 'mpi'"):
        model.fit(x, y, lengths=lengths, distributed="gloo", verbose=0)
    with pytest.raises(TypeError, match="distributed must be"):
        model.fit(x, y, lengths=lengths, distributed=3, verbose=0)
    with pytest.raises(ValueError, match="data must be"):
        cylstm.distributed.MPI(data="split")
    with pytest.raises(TypeError, match="comm must be"):
        cylstm.distributed.MPI(comm="world")
    with pytest.raises(TypeError, match="initial_epoch must be an int"):
        model.fit(x, y, lengths=lengths, epochs=2, initial_epoch=1.0, verbose=0)
    with pytest.raises(ValueError, match="initial_epoch must be at most epochs"):
        model.fit(x, y, lengths=lengths, epochs=2, initial_epoch=3, verbose=0)


def test_shard_rows_cover_the_rows_once():
    for n in (0, 1, 7, 37):
        for size in (1, 2, 3, 5):
            parts = [cylstm.distributed.shard_rows(n, r, size) for r in range(size)]
            rows = np.concatenate([np.arange(n)[p] for p in parts])
            np.testing.assert_array_equal(rows, np.arange(n))
    with pytest.raises(ValueError, match="rank must be < size"):
        cylstm.distributed.shard_rows(10, 3, 3)


# ---- resuming in one process ------------------------------------------------------------

def _interrupt_at(epoch, batch):
    def hook(b, logs):
        if len(hook.model.history.epoch) == epoch and b == batch:
            raise KeyboardInterrupt
    cb = LambdaCallback(on_batch_begin=hook)
    return cb, hook


def test_interrupted_fit_resumes_bitwise(tmp_path):
    """fit with shuffling, ragged lengths, dropout and a schedule, stopped by Ctrl-C in
    epoch 3; the epoch-2 checkpoint, loaded and run with initial_epoch=2, ends bitwise
    where the uninterrupted run ends."""
    x, y, lengths, val = M.data()
    kw = dict(batch_size=M.BATCH, epochs=5, lengths=lengths, validation_data=val, verbose=0)
    straight = M.build()
    h0 = straight.fit(x, y, callbacks=[StepLR(2, 0.5, base_lr=0.02)], **kw)

    killed = M.build()
    cb, hook = _interrupt_at(2, 1)
    hook.model = killed
    with pytest.raises(KeyboardInterrupt):
        killed.fit(x, y, callbacks=[StepLR(2, 0.5, base_lr=0.02), cb,
                                    ModelCheckpoint(tmp_path / "ckpt-{epoch}.npz")], **kw)
    assert not (tmp_path / "ckpt-3.npz").exists()
    resumed = cylstm.load(tmp_path / "ckpt-2.npz")
    h1 = resumed.fit(x, y, initial_epoch=2, callbacks=[StepLR(2, 0.5, base_lr=0.02)], **kw)
    assert h1.epoch == [2, 3, 4]
    np.testing.assert_array_equal(resumed.flat_params, straight.flat_params)
    assert h1.history["loss"] == h0.history["loss"][2:]


def test_fit_text_resumes_bitwise(tmp_path):
    _, train, val = M.text_data()
    straight, _ = M.text_reference(epochs=3)
    first = M.text_model()
    cylstm.text.fit_text(first, train, val, batch_size=7, seq_len=20, epochs=1, verbose=0)
    first.save(tmp_path / "t.npz")
    resumed = cylstm.load(tmp_path / "t.npz")
    cylstm.text.fit_text(resumed, train, val, batch_size=7, seq_len=20, epochs=3,
                         initial_epoch=1, verbose=0)
    np.testing.assert_array_equal(resumed.flat_params, straight.flat_params)


def test_one_rank_communicator_is_plain_fit():
    """distributed= with a one-rank communicator (no mpiexec) is fit, bitwise."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI
    x, y, lengths, val = M.data()
    runs = []
    for dist in (None, MPI.COMM_SELF):
        model = M.build()
        h = model.fit(x, y, batch_size=M.BATCH, epochs=3, lengths=lengths,
                      validation_data=val, callbacks=M.callbacks(), verbose=0,
                      distributed=dist)
        runs.append((model.flat_params.copy(), h.history))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


# ---- Dask batch inference ---------------------------------------------------------------

def _ragged_model():
    model = cylstm.Sequential([cylstm.LSTM(5, 24, batch_first=True), cylstm.Linear(24, 3)],
                              seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 12, 5)).astype(np.float32)
    lengths = rng.integers(1, 13, 203)
    return model, x, lengths


@needs_dask
@pytest.mark.parametrize("scheduler", ["threads", "processes", "synchronous"])
def test_dask_predict_is_bitwise_predict(scheduler):
    model, x, lengths = _ragged_model()
    want = model.predict(x, batch_size=16, lengths=lengths)
    # chunks of 37 rows: predict realigns them to whole batches of 16
    out = cylstm.distributed.predict(model, da.from_array(x, chunks=(37, 12, 5)),
                                     batch_size=16, lengths=da.from_array(lengths, 37))
    assert all(c % 16 == 0 for c in out.chunks[0][:-1])
    with dask.config.set(scheduler=scheduler):
        got = out.compute()
    np.testing.assert_array_equal(got, want)


@needs_dask
def test_dask_predict_on_a_local_cluster_ships_the_model_once(monkeypatch):
    from distributed import Client, LocalCluster
    model, x, lengths = _ragged_model()
    want_steps = model.predict(x, batch_size=32, lengths=lengths)
    lm = cylstm.text.char_model(11, embedding_dim=4, hidden_size=8, seed=1)
    ids = np.random.default_rng(1).integers(0, 11, (90, 15))
    want_ids = lm.predict(ids, batch_size=8)
    scattered = []
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, processes=True) as cluster, \
            Client(cluster) as client:
        original = client.scatter

        def spy(data, **kw):
            scattered.append(kw.get("broadcast"))
            return original(data, **kw)
        monkeypatch.setattr(client, "scatter", spy)
        out = cylstm.distributed.predict(model, da.from_array(x, chunks=(50, 12, 5)),
                                         batch_size=32, lengths=lengths, threads=1)
        assert out.numblocks[0] > 2
        got = out.compute()
        got_ids = cylstm.distributed.predict(lm, da.from_array(ids, chunks=(20, 15)),
                                             batch_size=8).compute()
    assert scattered == [True, True]        # once per predict call, to every worker
    np.testing.assert_array_equal(got, want_steps)
    np.testing.assert_array_equal(got_ids, want_ids)


@needs_dask
def test_dask_predict_checks_its_arguments():
    model, x, lengths = _ragged_model()
    with pytest.raises(TypeError, match="x must be a dask.array"):
        cylstm.distributed.predict(model, x)
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, F\)"):
        cylstm.distributed.predict(model, da.from_array(x[:, :, 0]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        cylstm.distributed.predict(model, da.from_array(x), lengths=lengths[:5])
    with pytest.raises(TypeError, match="batch_size must be an int"):
        cylstm.distributed.predict(model, da.from_array(x), batch_size=2.0)
