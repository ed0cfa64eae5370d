"""Characters: a vocabulary, a character language model, truncated BPTT, sampling.

    text = cylstm.text.default_text()                # ~465 KB of English, in every Python
    vocab = cylstm.text.CharVocab.from_text(text)
    ids = vocab.encode(text)
    model = cylstm.text.char_model(vocab.size, hidden_size=256, seed=0)
    model.compile(loss="cross_entropy", optimizer="adam", lr=3e-3, metrics=["bpc"],
                  clip_norm=1.0)
    cylstm.text.fit_text(model, ids[:-20000], ids[-20000:], batch_size=32, seq_len=64)
    print(cylstm.text.sample(model, vocab, prime="The ", length=200, temperature=0.8))

Truncated BPTT over a long text: the text is cut into ``batch_size`` parallel streams
(row b is the b-th contiguous slice), and each batch is the next ``seq_len`` characters
of every stream. The LSTM state a batch ends with is where the next one starts (so
the model sees context longer than ``seq_len``); gradients stop at batch boundaries.
"""

import math
import numbers

import numpy as np

from ._check import positive_int as _positive_int
from .embedding import Embedding
from .layers import LSTM, Linear
from ._threads import loop_hold
from .model import Sequential, Stats

__all__ = ["CharVocab", "default_text", "char_model", "stream_batches", "fit_text",
           "evaluate_text", "sample"]


def default_text():
    """The documentation topics of Python's own ``pydoc_data.topics`` (the text of
    ``help('...')`` pages, about 465 KB of English with code), joined in key order:
    text every Python install has, so nothing needs downloading."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


class CharVocab:
    """A character vocabulary: ``encode(str) -> int32 ids``, ``decode(ids) -> str``.

    ``CharVocab(chars)`` with ``chars`` the distinct characters in id order (a string);
    ``CharVocab.from_text(text)`` takes them sorted from a text."""

    def __init__(self, chars):
        if not isinstance(chars, str) or not chars:
            raise TypeError("chars must be a non-empty string of distinct characters")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        self._lut = None

    @classmethod
    def from_text(cls, text):
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        return cls("".join(sorted(set(text))))

    @property
    def size(self):
        return len(self.chars)

    def __len__(self):
        return len(self.chars)

    def __repr__(self):
        return f"CharVocab({self.size} characters)"

    def encode(self, text):
        """str -> (len(text),) int32 ids; unknown characters raise ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        if self._lut is None:                     # code point -> id, -1 where unknown
            top = max(ord(c) for c in self.chars) + 1
            self._lut = np.full(top, -1, np.int32)
            for c, i in self._index.items():
                self._lut[ord(c)] = i
        ids = np.full(codes.shape, -1, np.int32)
        known = codes < self._lut.size
        ids[known] = self._lut[codes[known]]
        if ids.size and ids.min() < 0:
            bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:50]})
            raise ValueError(f"text has characters outside the vocabulary: {bad!r}")
        return ids

    def decode(self, ids):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids must be in 0..{self.size - 1}")
        return "".join(self.chars[i] for i in ids.reshape(-1))


def char_model(vocab_size, embedding_dim=64, hidden_size=256, num_layers=1, dropout=0.0,
               dtype="float32", seed=None, init=None, recurrent_dropout=0.0,
               checkpoint_every=None):
    """Embedding(V, E) -> LSTM(E, H, num_layers) -> Linear(H, V), every step.
    ``recurrent_dropout`` and ``checkpoint_every`` are the LSTM's (cylstm.LSTM)."""
    V = _positive_int(vocab_size, "vocab_size")
    return Sequential([
        Embedding(V, embedding_dim, dtype=dtype),
        LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
             dropout=dropout, dtype=dtype, recurrent_dropout=recurrent_dropout,
             checkpoint_every=checkpoint_every),
        Linear(hidden_size, V, dtype=dtype),
    ], seed=seed, init=init)


def _ids(ids, name, vocab_size=None):
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise TypeError(f"{name} must be a 1-D array of integer ids, got {ids.dtype} "
                        f"{ids.shape}")
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must hold ids in 0..{vocab_size - 1} (the model's "
                         f"vocabulary), got values in {ids.min()}..{ids.max()}")
    return ids.astype(np.int64, copy=False)


def stream_batches(ids, batch_size, seq_len):
    """[(x (B, t), y (B, t))]: the text as ``batch_size`` streams cut into ``seq_len``
    steps (the last batch may be shorter); y is x shifted by one character."""
    ids = _ids(ids, "ids")
    B = _positive_int(batch_size, "batch_size")
    T = _positive_int(seq_len, "seq_len")
    n = (ids.size - 1) // B
    if n < 1:
        raise ValueError(f"{ids.size} ids are too few for {B} streams (need > {B})")
    x = ids[:B * n].reshape(B, n)
    y = ids[1:B * n + 1].reshape(B, n)
    return [(x[:, t:t + T], y[:, t:t + T]) for t in range(0, n, T)]


def _vocab_size(model):
    first = model.layers[0]
    if not model.token_input or not model.sequence_output:
        raise TypeError("a text model takes token ids (its first layer is an Embedding) "
                        "and outputs every step (see char_model)")
    return first.num_embeddings


def evaluate_text(model, ids, batch_size=32, seq_len=64):
    """The model's loss and metrics on a text (ids), carrying the state through it."""
    V = _vocab_size(model)
    model._check_compiled()
    return _evaluate_streams(model, _ids(ids, "ids", V), batch_size, seq_len).logs(model.metrics)


def _evaluate_streams(model, ids, batch_size, seq_len, rows=slice(None)):
    model.eval()
    stats, states = Stats(model.loss), None
    for x, y in stream_batches(ids, batch_size, seq_len):
        step = model.eval_step(x[rows], y[rows], None, states)
        stats.add(step)
        states = step.states
    return stats


def fit_text(model, train_ids, val_ids=None, batch_size=32, seq_len=64, epochs=1,
             callbacks=None, verbose=1, initial_epoch=0, distributed=None):
    """Train a character (or token) model with truncated BPTT; returns a History.

    train_ids / val_ids: 1-D integer ids (``vocab.encode(text)``). Each epoch walks
    the training streams once with the state carried from batch to batch; validation
    (after each epoch, "val_loss" and "val_<metric>") carries its state through the
    validation text in ``batch_size`` streams too. Everything else (callbacks,
    progress, NaN/Inf checks, Ctrl-C, initial_epoch) is as in ``Sequential.fit``.
    distributed: "mpi" (or a communicator) splits the ``batch_size`` streams of every
    batch among the MPI ranks (each rank carries its own streams' states); every rank
    passes the same ids, and batch_size must be at least the number of ranks."""
    V = _vocab_size(model)
    model._check_compiled()
    train_ids = _ids(train_ids, "train_ids", V)
    batches = stream_batches(train_ids, batch_size, seq_len)
    if val_ids is not None:
        val_ids = _ids(val_ids, "val_ids", V)
        stream_batches(val_ids, batch_size, seq_len)          # checks it is long enough
    epochs = _positive_int(epochs, "epochs", minimum=0)
    if distributed is not None:
        from . import distributed as _distributed          # mpi4py only when asked for
        return _distributed._Run(model, distributed).fit_streams(
            batches, val_ids, batch_size, seq_len, epochs, callbacks, verbose, initial_epoch)
    validate = (lambda: _evaluate_streams(model, val_ids, batch_size, seq_len)) \
        if val_ids is not None else (lambda: None)
    return model.fit_batches(lambda epoch: ((x, y, None) for x, y in batches), len(batches),
                             epochs, validate, callbacks, verbose, stateful=True,
                             initial_epoch=initial_epoch)


def _next_id(logits, temperature, top_k, rng):
    z = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    if top_k is not None and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    # What rng.choice(z.size, p=p) computes, draw for draw, without its checks of p
    # (a third of the time of a step): the same one uniform number against the same cdf.
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def sample(model, vocab, prime="", length=200, temperature=1.0, top_k=None, seed=None):
    """Generate ``length`` characters after ``prime`` (returned without the prime).

    The prime is fed through the model step by step (streaming, state carried); each
    next character is drawn from softmax(logits / temperature), restricted to the
    ``top_k`` most likely when set; temperature 0 takes the most likely (greedy).
    An empty prime starts from a newline (or the first character of the vocabulary)."""
    V = _vocab_size(model)
    if vocab.size != V:
        raise ValueError(f"vocab has {vocab.size} characters, the model {V}")
    length = _positive_int(length, "length", minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        top_k = _positive_int(top_k, "top_k")
    rng = np.random.default_rng(seed)
    if not prime:
        prime = "\n" if "\n" in vocab.chars else vocab.chars[0]
    ids = vocab.encode(prime)
    with loop_hold:
        states = model.initial_state(1)
        tok = np.empty(1, np.int64)
        for i in ids[:-1]:
            tok[0] = i
            model.step(tok, states)
        out, last = [], int(ids[-1])
        for _ in range(length):
            tok[0] = last
            logits = model.step(tok, states)[0]
            last = _next_id(logits, temperature, top_k, rng)
            out.append(last)
    return vocab.decode(np.array(out, np.int64))
