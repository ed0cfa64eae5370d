"""Characters: vocabulary, stream batching, truncated BPTT, sampling, and the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

import cylstm
from cylstm import text

ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(cylstm.__file__)))


def test_vocab_round_trip_and_errors():
    v = text.CharVocab.from_text("hello, wörld\n")
    assert v.chars == "".join(sorted(set("hello, wörld\n")))
    ids = v.encode("wörld hello")
    assert ids.dtype == np.int32 and v.decode(ids) == "wörld hello"
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['z'\]"):
        v.encode("hez")
    with pytest.raises(ValueError, match="must be in 0.."):
        v.decode([0, 99])
    with pytest.raises(ValueError, match="repeat"):
        text.CharVocab("aa")


def test_default_text_is_the_standard_library_docs():
    t = text.default_text()
    assert 300_000 < len(t) < 2_000_000 and "for" in t and "class" in t


def test_stream_batches_cut_the_text_into_parallel_streams():
    ids = np.arange(103)
    batches = text.stream_batches(ids, batch_size=4, seq_len=10)
    n = (103 - 1) // 4                                   # 25 steps per stream
    assert [x.shape for x, _ in batches] == [(4, 10), (4, 10), (4, 5)]
    x = np.concatenate([b[0] for b in batches], axis=1)
    y = np.concatenate([b[1] for b in batches], axis=1)
    np.testing.assert_array_equal(x, np.arange(4 * n).reshape(4, n))   # row b: slice b
    np.testing.assert_array_equal(y, x + 1)
    with pytest.raises(ValueError, match="too few"):
        text.stream_batches(np.arange(4), 4, 2)


def test_state_is_carried_between_batches():
    """With carried state, batch-by-batch evaluation equals one pass over the whole
    streams; without it, it would not."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, 2 * 40 + 1)
    model = text.char_model(5, embedding_dim=3, hidden_size=8, dtype="float64", seed=0)
    model.compile(loss="cross_entropy", metrics=["bpc"])
    chunked = text.evaluate_text(model, ids, batch_size=2, seq_len=7)["loss"]
    whole = text.evaluate_text(model, ids, batch_size=2, seq_len=40)["loss"]
    assert abs(chunked - whole) < 1e-12


def test_fit_text_learns_a_repetitive_text_and_sampling_is_seeded():
    corpus = "the cat sat on the mat. " * 60
    vocab = text.CharVocab.from_text(corpus)
    ids = vocab.encode(corpus)
    model = text.char_model(vocab.size, embedding_dim=8, hidden_size=32, seed=0)
    model.compile(loss="cross_entropy", optimizer="adam", lr=1e-2, metrics=["bpc"],
                  clip_norm=5.0)
    hist = text.fit_text(model, ids[:1200], ids[1200:], batch_size=4, seq_len=20,
                         epochs=6, verbose=0)
    assert hist.history["val_bpc"][-1] < 0.5 < hist.history["val_bpc"][0] + 1
    a = text.sample(model, vocab, prime="the ", length=40, temperature=0.5, seed=1)
    b = text.sample(model, vocab, prime="the ", length=40, temperature=0.5, seed=1)
    assert a == b and len(a) == 40 and set(a) <= set(vocab.chars)
    greedy = text.sample(model, vocab, prime="the c", length=20, temperature=0)
    assert greedy == text.sample(model, vocab, prime="the c", length=20, top_k=1, seed=9)
    assert greedy.startswith("at sat on the mat")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text.sample(model, vocab, prime="xyz")
    with pytest.raises(ValueError, match="temperature"):
        text.sample(model, vocab, temperature=-1)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cylstm", *args], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=cwd)


def test_cli_train_then_generate_end_to_end(tmp_path):
    (tmp_path / "tiny.txt").write_text("a stitch in time saves nine. " * 80)
    out = _cli("train", "--text", "tiny.txt", "--epochs", "2", "--hidden-size", "32",
               "--embedding-dim", "8", "--batch-size", "4", "--seq-len", "16",
               "--model", "m.npz", "--length", "60", "--prime", "a st", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "validation bits/character per epoch:" in out.stdout
    assert "Epoch 2/2" in out.stdout and "val_bpc" in out.stdout
    assert (tmp_path / "m.npz").exists()
    model = cylstm.load(tmp_path / "m.npz")
    assert model.metadata["vocab"] == "".join(sorted(set("a stitch in time saves nine. ")))
    gen = _cli("generate", "--model", "m.npz", "--prime", "a st", "--length", "30",
               "--seed", "3", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("a st") and len(gen.stdout.rstrip("\n")) == 34
    again = _cli("generate", "--model", "m.npz", "--prime", "a st", "--length", "30",
                 "--seed", "3", cwd=tmp_path)
    assert again.stdout == gen.stdout


def test_cli_help_and_errors(tmp_path):
    helped = _cli("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    for option in ("--text", "--epochs", "--batch-size", "--seq-len", "--hidden-size",
                   "--num-layers", "--lr", "--clip-norm", "--model", "--temperature",
                   "--top-k", "--prime", "--threads", "pydoc_data.topics"):
        assert option in helped.stdout, option
    assert _cli("generate", "--help", cwd=tmp_path).returncode == 0
    missing = _cli("generate", "--model", "nope.npz", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.npz" in missing.stderr
    (tmp_path / "junk.npz").write_bytes(b"junk")
    junk = _cli("generate", "--model", "junk.npz", cwd=tmp_path)
    assert junk.returncode == 2 and "not an .npz archive" in junk.stderr
    cylstm.save(cylstm.LSTM(2, 3), tmp_path / "lstm.npz")
    notlm = _cli("generate", "--model", "lstm.npz", cwd=tmp_path)
    assert notlm.returncode == 2 and "not a character model" in notlm.stderr
    (tmp_path / "t.txt").write_text("abc")
    short = _cli("train", "--text", "t.txt", cwd=tmp_path)
    assert short.returncode == 2 and "too short" in short.stderr


def _tiny_train(*extra, cwd, model="m.npz"):
    return _cli("train", "--text", "tiny.txt", "--hidden-size", "16", "--embedding-dim", "4",
                "--batch-size", "4", "--seq-len", "8", "--model", model, "--length", "5",
                "--prime", "a st", *extra, cwd=cwd)


def test_cli_train_never_replaces_a_model_it_was_not_told_to(tmp_path):
    (tmp_path / "tiny.txt").write_text("a stitch in time saves nine. " * 40)
    first = _tiny_train("--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "m.npz").read_bytes()
    again = _tiny_train("--epochs", "0", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "m.npz").read_bytes() == before          # untouched
    resumed = _tiny_train("--epochs", "1", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    model = cylstm.load(tmp_path / "m.npz")
    assert model.metadata["epochs"] == 2 and model.optimizer.step_count > 0
    replaced = _tiny_train("--epochs", "0", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert cylstm.load(tmp_path / "m.npz").metadata["epochs"] == 0
    both = _tiny_train("--resume", "--overwrite", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    nothing = _tiny_train("--resume", cwd=tmp_path, model="none.npz")
    assert nothing.returncode == 2 and "none.npz" in nothing.stderr
    bad_prime = _cli("train", "--text", "tiny.txt", "--model", "new.npz", "--prime", "XYZ",
                     cwd=tmp_path)
    assert bad_prime.returncode == 2 and "--prime" in bad_prime.stderr
    assert not (tmp_path / "new.npz").exists()


@pytest.mark.parametrize("option,value", [("--epochs", "-1"), ("--batch-size", "0"),
                                          ("--seq-len", "0"), ("--hidden-size", "0"),
                                          ("--lr", "0"), ("--dropout", "1.5"),
                                          ("--val-fraction", "1"), ("--threads", "-2"),
                                          ("--temperature", "-1"), ("--top-k", "x")])
def test_cli_train_checks_arguments_before_any_work(tmp_path, option, value):
    # No --text: a late check would first load and encode Python's documentation and
    # build the model; argparse answers before that, naming the option.
    out = _cli("train", option, value, "--model", "m.npz", cwd=tmp_path)
    assert out.returncode == 2 and option in out.stderr, out.stderr
    assert not (tmp_path / "m.npz").exists()


def test_cli_train_help_shows_each_default_once(tmp_path):
    helped = _cli("train", "--help", cwd=tmp_path).stdout
    assert "(default: None)" not in helped
    assert "(default: 3)" in " ".join(helped.split())          # --epochs


def test_cli_train_saves_every_epoch_so_a_killed_run_keeps_the_last_one(tmp_path):
    import signal
    import time
    (tmp_path / "tiny.txt").write_text("a stitch in time saves nine. " * 400)
    proc = subprocess.Popen([sys.executable, "-m", "cylstm", "train", "--text", "tiny.txt",
                             "--hidden-size", "64", "--embedding-dim", "8", "--batch-size",
                             "4", "--seq-len", "16", "--epochs", "1000", "--model", "m.npz",
                             "--threads", "1", "--prime", "a st"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (tmp_path / "m.npz").exists():
                break
            time.sleep(0.05)
        time.sleep(0.3)                      # mid-way through a later epoch, or a save
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    model = cylstm.load(tmp_path / "m.npz")  # whole and loadable
    assert model.metadata["epochs"] >= 1


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (2.0, None)])
def test_next_id_draws_what_rng_choice_draws(temperature, top_k):
    """sample's draw is rng.choice(V, p=softmax) without its checks: the same ids for
    the same generator state."""
    from cylstm.text import _next_id
    for seed in range(300):
        z = np.random.default_rng(seed).standard_normal(41).astype(np.float32) * 3
        zz = z.astype(np.float64) / temperature
        if top_k is not None:
            zz = np.where(zz >= np.partition(zz, -top_k)[-top_k], zz, -np.inf)
        p = np.exp(zz - zz.max())
        p /= p.sum()
        want = int(np.random.default_rng(seed + 7).choice(z.size, p=p))
        assert _next_id(z, temperature, top_k, np.random.default_rng(seed + 7)) == want
