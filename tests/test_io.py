"""Model files: round trips, resuming training, and every kind of bad file."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import cylstm
from cylstm import io


def _model(seed=0):
    return cylstm.Sequential([
        cylstm.Embedding(11, 4),
        cylstm.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3),
        cylstm.Dropout(0.1),
        cylstm.Linear(6, 11),
    ], seed=seed, loss="cross_entropy", optimizer="adamw", lr=1e-2, metrics=["accuracy"],
        weight_decay=0.05, clip_norm=None)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (12, 7)), rng.integers(0, 11, (12, 7)), rng.integers(1, 8, 12)


def test_round_trip_gives_identical_predictions_and_config(tmp_path):
    x, y, lengths = _data()
    model = _model()
    model.fit(x, y, lengths=lengths, epochs=2, batch_size=4, verbose=0)
    model.metadata = {"note": "hello", "vocab": "abc"}
    path = tmp_path / "m.npz"
    model.save(path)
    back = cylstm.load(path)
    assert isinstance(back, cylstm.Sequential)
    assert [type(l).__name__ for l in back.layers] == [type(l).__name__ for l in model.layers]
    assert back.layers[1].get_config() == model.layers[1].get_config()
    np.testing.assert_array_equal(back.flat_params, model.flat_params)
    np.testing.assert_array_equal(back.predict(x, lengths=lengths),
                                  model.predict(x, lengths=lengths))
    assert back.metadata == {"note": "hello", "vocab": "abc"}
    assert back.loss == "cross_entropy" and back.metrics == ("accuracy",)
    assert isinstance(back.optimizer, cylstm.optim.AdamW)
    assert back.optimizer.hyper_parameters == model.optimizer.hyper_parameters
    assert back.optimizer.clip_norm is None
    assert not any(f.startswith(".m.npz") for f in os.listdir(tmp_path))  # no temp left


def test_resumed_training_continues_exactly(tmp_path):
    x, y, lengths = _data(1)
    straight = _model(5)
    straight.fit(x, y, lengths=lengths, epochs=2, batch_size=4, shuffle=False, verbose=0)
    straight.fit(x, y, lengths=lengths, epochs=2, batch_size=4, shuffle=False, verbose=0)

    first = _model(5)
    first.fit(x, y, lengths=lengths, epochs=2, batch_size=4, shuffle=False, verbose=0)
    first.save(tmp_path / "ckpt.npz")
    resumed = cylstm.load(tmp_path / "ckpt.npz")
    assert resumed.optimizer.step_count == first.optimizer.step_count
    # the file holds the seed; epoch k's dropout streams derive from it (initial_epoch)
    resumed.fit(x, y, lengths=lengths, epochs=4, initial_epoch=2, batch_size=4,
                shuffle=False, verbose=0)
    np.testing.assert_array_equal(resumed.flat_params, straight.flat_params)


@pytest.mark.parametrize("layer", [
    cylstm.LSTM(3, 4, num_layers=2, proj_size=2, dtype="float64"),
    cylstm.Linear(3, 2),
    cylstm.Embedding(5, 2, padding_idx=1),
])
def test_single_layers_round_trip(tmp_path, layer):
    cylstm.save(layer, tmp_path / "l.npz")
    back = cylstm.load(tmp_path / "l.npz")
    assert type(back) is type(layer) and back.get_config() == layer.get_config()
    for k, v in layer.params.items():
        np.testing.assert_array_equal(back.params[k], v)
        assert back.params[k].dtype == v.dtype


def test_save_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="save takes a cylstm.Sequential"):
        cylstm.save(cylstm.Dropout(0.1), tmp_path / "d.npz")
    model = _model()
    with pytest.raises(TypeError, match="not plain JSON"):
        cylstm.save(model, tmp_path / "x.npz", metadata={"f": object()})
    assert os.listdir(tmp_path) == []


def _saved(tmp_path):
    model = _model()
    path = tmp_path / "m.npz"
    model.save(path)
    return model, path


def test_truncated_files_are_refused_with_the_file_named(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cannot load .*cut{cut}\.npz"):
            cylstm.load(bad)


def test_every_flipped_byte_of_an_array_is_caught(tmp_path):
    model, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("param/1.weight_hh_l0.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128
    rng = np.random.default_rng(0)
    for pos in rng.integers(start, start + info.file_size - 128, 20):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        bad = tmp_path / "flip.npz"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="cannot load"):
            cylstm.load(bad)


def test_foreign_newer_and_hostile_files(tmp_path):
    model, path = _saved(tmp_path)
    # not a zip at all
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz archive"):
        cylstm.load(tmp_path / "text.npz")
    # a NumPy archive that is not a cylstm model
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="no __config__ entry"):
        cylstm.load(tmp_path / "foreign.npz")
    # an object array: allow_pickle=False refuses it, nothing runs
    np.savez(tmp_path / "pickle.npz", __config__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot load"):
        cylstm.load(tmp_path / "pickle.npz")

    def rewrite(name, edit):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(arrays["__config__"].tobytes())
        edit(header, arrays)
        arrays["__config__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    newer = rewrite("newer.npz", lambda h, a: h.update(version=io.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="newer cylstm.*upgrade"):
        cylstm.load(newer)
    other = rewrite("other.npz", lambda h, a: h.update(format="something-else"))
    with pytest.raises(ValueError, match="not a cylstm model file"):
        cylstm.load(other)

    def reshape(h, a):
        a["param/3.bias"] = np.zeros(5, np.float32)
        h["arrays"]["param/3.bias"] = {"shape": [5], "dtype": "<f4",
                                       "sha256": io._digest(a["param/3.bias"])}
    with pytest.raises(ValueError, match=r"parameter '3.bias' is float32 \(5,\)"):
        cylstm.load(rewrite("shape.npz", reshape))

    def extra(h, a):
        a["param/9.weight"] = np.zeros(2, np.float32)
        h["arrays"]["param/9.weight"] = {"shape": [2], "dtype": "<f4",
                                         "sha256": io._digest(a["param/9.weight"])}
    with pytest.raises(ValueError, match="unexpected parameters"):
        cylstm.load(rewrite("extra.npz", extra))
    bad_layer = rewrite("layer.npz", lambda h, a: h["config"]["layers"][1].update(type="GRU"))
    with pytest.raises(ValueError, match="model config is invalid"):
        cylstm.load(bad_layer)
    with pytest.raises(FileNotFoundError):
        cylstm.load(tmp_path / "missing.npz")


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


_SAVER = r"""
import sys, numpy as np, cylstm
model = cylstm.Sequential([cylstm.LSTM(64, 512, num_layers=2, batch_first=True),
                           cylstm.Linear(512, 64)], seed=1)
path = sys.argv[1]
model.save(path)
print("ready", flush=True)
k = 0
while True:                       # rewrite the file with new weights until killed
    k += 1
    model.flat_params[...] = k
    model.save(path)
"""


def test_a_process_killed_mid_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "live.npz"
    initial = cylstm.Sequential([cylstm.LSTM(64, 512, num_layers=2, batch_first=True),
                                 cylstm.Linear(512, 64)], seed=1)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cylstm.__file__)))
    for delay in (0.05, 0.13, 0.31):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env,
                                 stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        # (cwd: "-c" puts the working folder first on sys.path, and a source checkout
        # there would shadow the installed, built package)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        model = cylstm.load(path)                   # whole: one of the versions written
        values = np.unique(model.flat_params)
        if len(values) == 1:
            assert values[0] >= 1 and float(values[0]).is_integer()
        else:
            np.testing.assert_array_equal(model.flat_params, initial.flat_params)
        assert [f for f in os.listdir(tmp_path) if not f.endswith(".tmp")] == ["live.npz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_model_has_the_mode_of_any_new_file(tmp_path):
    # mkstemp makes 0600 files; a model must be readable by whoever the umask allows
    # (trained by one user, served by another).
    old = os.umask(0o022)
    try:
        cylstm.save(cylstm.LSTM(2, 3), tmp_path / "m.npz")
        assert (os.stat(tmp_path / "m.npz").st_mode & 0o777) == 0o644
        os.umask(0o077)
        cylstm.save(cylstm.LSTM(2, 3), tmp_path / "private.npz")
        assert (os.stat(tmp_path / "private.npz").st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
