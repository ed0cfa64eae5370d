"""Run under ``mpiexec -n N python tests/mpi_train.py CASE OUT_DIR [options]`` by
tests/test_distributed_mpi.py; also imported by it for the one-process references.

Every case builds the same seeded float64 model and data (``build``); rank 0 writes
what the test compares to OUT_DIR, every rank writes its weights' checksum."""

import json
import os
import sys
import zlib

import numpy as np

import cylstm
import cylstm.distributed
from cylstm.callbacks import (Callback, EarlyStopping, LambdaCallback, ModelCheckpoint,
                              StepLR)

N_ROWS, T_MAX, F, H, CLASSES = 37, 9, 3, 6, 4


def data(seed=1):
    """Ragged sequences with per-sequence class labels, and a validation set."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_ROWS, T_MAX, F))
    lengths = rng.integers(2, T_MAX + 1, N_ROWS)
    xv = rng.standard_normal((11, T_MAX, F))
    lv = rng.integers(2, T_MAX + 1, 11)

    def label(x, lengths):     # learnable: the sign pattern of the last valid step
        last = x[np.arange(len(x)), lengths - 1]
        return (last[:, 0] > 0) * 2 + (last[:, 1] > 0)
    return x, label(x, lengths), lengths, (xv, label(xv, lv), lv)


def build(seed=0):
    """Two stacked LSTM layers with dropout between them, a Dropout layer, float64."""
    model = cylstm.Sequential([
        cylstm.LSTM(F, H, num_layers=2, dropout=0.3, batch_first=True, dtype="float64"),
        cylstm.Dropout(0.25),
        cylstm.LastStep(),
        cylstm.Linear(H, CLASSES, dtype="float64"),
    ], seed=seed)
    model.compile(loss="cross_entropy", optimizer="adam", lr=0.02, metrics=["accuracy"],
                  clip_norm=5.0)
    return model


def callbacks(patience=1):
    # EarlyStopping on a tight patience and a schedule: both must act the same everywhere.
    return [EarlyStopping(monitor="val_loss", patience=patience, min_delta=1e-3),
            StepLR(step_size=2, gamma=0.5, base_lr=0.02)]


BATCH, EPOCHS = 10, 8


def reference(epochs=EPOCHS, sharded_data=False):
    """The one-process run every MPI case must reproduce."""
    x, y, lengths, val = data()
    model = build()
    hist = model.fit(x, y, batch_size=BATCH, epochs=epochs, lengths=lengths,
                     validation_data=val, callbacks=callbacks(), verbose=0)
    return model, hist


def text_data():
    text = cylstm.text.default_text()[:6000]
    vocab = cylstm.text.CharVocab.from_text(text)
    ids = vocab.encode(text)
    return vocab, ids[:5000], ids[5000:]


def text_model():
    vocab, _, _ = text_data()
    model = cylstm.text.char_model(vocab.size, embedding_dim=8, hidden_size=12,
                                   num_layers=2, dropout=0.2, dtype="float64", seed=3)
    model.compile(loss="cross_entropy", optimizer="adam", lr=0.01, metrics=["bpc"],
                  clip_norm=1.0)
    return model


def text_reference(epochs=2):
    _, train, val = text_data()
    model = text_model()
    hist = cylstm.text.fit_text(model, train, val, batch_size=7, seq_len=20, epochs=epochs,
                                verbose=0)
    return model, hist


def _checksum(model):
    return zlib.crc32(model.flat_params.view(np.uint8))


def main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    case, out = sys.argv[1], sys.argv[2]
    extra = sys.argv[3:]
    x, y, lengths, val = data()
    model = build()
    result = {}

    if case in ("equiv", "sharded"):
        dist = "mpi"
        if case == "sharded":
            dist = cylstm.distributed.MPI(data="sharded")
            rows = cylstm.distributed.shard_rows(len(x), rank, size)
            vrows = cylstm.distributed.shard_rows(len(val[0]), rank, size)
            x, y, lengths = x[rows], y[rows], lengths[rows]
            val = tuple(a[vrows] for a in val)
        ckpt = ModelCheckpoint(os.path.join(out, "best.npz"), save_best_only=True)
        hist = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, lengths=lengths,
                         validation_data=val, callbacks=callbacks() + [ckpt], verbose=0,
                         distributed=dist)
        result["history"] = hist.history
        result["epochs_run"] = len(hist.epoch)
        result["saved"] = len(ckpt.saved)            # rank 0 alone writes files

    elif case == "text":
        _, train, vids = text_data()
        model = text_model()
        hist = cylstm.text.fit_text(model, train, vids, batch_size=7, seq_len=20, epochs=2,
                                    verbose=0, distributed="mpi")
        result["history"] = hist.history

    elif case == "nan":
        # Sharded data where only rank 1's shard holds a NaN: the global batch holding it
        # makes rank 1's loss NaN, and every rank must stop at that same step.
        rows = cylstm.distributed.shard_rows(len(x), rank, size)
        x, y, lengths = x[rows].copy(), y[rows], lengths[rows]
        if rank == 1:
            x[0, 0, 0] = np.nan
        try:
            model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, lengths=lengths, verbose=0,
                      distributed=cylstm.distributed.MPI(data="sharded"))
            result["error"] = None
        except FloatingPointError as e:
            result["error"] = str(e)
        result["step"] = model.optimizer.step_count

    elif case in ("raise", "interrupt", "kill"):
        # One rank fails in the second epoch; rank 0 has saved epoch 1 by then.
        def fail(batch, logs):
            if rank == size - 1 and len(model.history.epoch) == 1 and batch == 1:
                if case == "raise":
                    raise ValueError("a bad batch on purpose")
                if case == "interrupt":
                    raise KeyboardInterrupt
                os.kill(os.getpid(), 9)
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, lengths=lengths,
                  validation_data=val, verbose=0, distributed="mpi",
                  callbacks=[ModelCheckpoint(os.path.join(out, "ckpt-{epoch}.npz")),
                             LambdaCallback(on_batch_begin=fail)])

    elif case == "unseeded":
        # No seed: each rank initialises differently; rank 0's weights and shuffling
        # stream are broadcast at the start, so the ranks train one model.
        model = build(seed=None)
        model.fit(x, y, batch_size=BATCH, epochs=2, lengths=lengths, verbose=0,
                  distributed="mpi")

    elif case == "forever":
        # Trains until interrupted from outside (Ctrl-C to mpiexec), saving every epoch.
        model.fit(x, y, batch_size=BATCH, epochs=10 ** 6, lengths=lengths, verbose=0,
                  distributed="mpi",
                  callbacks=[ModelCheckpoint(os.path.join(out, "last.npz"))])

    elif case == "diverge":
        # Rank 1 nudges one weight behind the others' backs: the epoch-end checksum
        # must catch it on every rank.
        def nudge(batch, logs):
            if rank == 1 and batch == 0:
                model.flat_params[0] += 1e-12
        try:
            model.fit(x, y, batch_size=BATCH, epochs=2, lengths=lengths, verbose=0,
                      distributed="mpi", callbacks=[LambdaCallback(on_batch_end=nudge)])
            result["error"] = None
        except RuntimeError as e:
            result["error"] = str(e)

    elif case == "resume":
        # Load the checkpoint of epoch k and run epochs k..EPOCHS-1 across the ranks.
        k = int(extra[0])
        model = cylstm.load(os.path.join(out, f"ckpt-{k}.npz"))
        hist = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, lengths=lengths,
                         validation_data=val, verbose=0, distributed="mpi",
                         initial_epoch=k,
                         callbacks=[StepLR(step_size=2, gamma=0.5, base_lr=0.02)])
        result["epochs"] = hist.epoch

    elif case == "recurrent_dropout":
        # Not supported across ranks yet: every rank refuses with the same clear error.
        model = cylstm.Sequential([
            cylstm.LSTM(F, H, recurrent_dropout=0.2, batch_first=True, dtype="float64"),
            cylstm.LastStep(), cylstm.Linear(H, CLASSES, dtype="float64")], seed=0)
        model.compile(loss="cross_entropy", optimizer="adam")
        try:
            model.fit(x, y, batch_size=BATCH, epochs=1, lengths=lengths, verbose=0,
                      distributed="mpi")
            result["error"] = None
        except ValueError as e:
            result["error"] = str(e)

    elif case == "plain":
        # Same schedule as "resume" but uninterrupted, for the bitwise comparison.
        hist = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, lengths=lengths,
                         validation_data=val, verbose=0, distributed="mpi",
                         callbacks=[StepLR(step_size=2, gamma=0.5, base_lr=0.02)])
    else:
        raise SystemExit(f"unknown case {case!r}")

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checksum": _checksum(model), **result}, f)
    if rank == 0:
        np.save(os.path.join(out, f"{case}-weights.npy"), model.flat_params)


if __name__ == "__main__":
    main()
