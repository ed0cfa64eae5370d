"""Beyond one machine: data-parallel training over MPI, batch inference with Dask.

Training (needs the ``mpi`` extra: ``pip install "cylstm[mpi]"``)::

    # mpiexec -n 4 python train.py
    model.fit(x, y, batch_size=256, epochs=10, distributed="mpi")
    cylstm.text.fit_text(model, ids, val_ids, batch_size=64, distributed="mpi")

``batch_size`` is the GLOBAL batch. Every rank builds the same global batches (the
shuffling comes from the model's seed, identically on every rank), computes the
gradient of the mean loss over its share of each batch, weights it by its share of the
counted positions, and one ``Allreduce`` (in place, on ``model.flat_grads``) sums the
shares into the gradient of the global batch's mean loss. Every rank then takes the same
optimiser step, so all ranks hold the same weights; after every epoch a checksum of the
weights is compared across ranks and a difference raises RuntimeError. A seeded model
trained on N ranks ends with the weights one process gets with the same global batch,
to rounding (the sums are taken in another order), dropout masks included.

Data, two ways (``distributed=MPI(comm=None, data=...)``; "mpi" is ``MPI()``):

* ``data="replicated"`` (the default): every rank passes the same x, y (and lengths,
  validation data); rank r trains on its contiguous part of each global batch. The
  ranks check once that they hold the same data.
* ``data="sharded"``: rank r passes only its shard, the rows ``shard_rows(N, r, size)``
  of the global data set, which is the ranks' shards concatenated in rank order. Global
  batches index that concatenation exactly as one process indexes the whole array;
  each rank trains on the rows of every global batch it holds (their number varies from
  batch to batch). ``validation_data`` is then this rank's shard of the validation set;
  ``validation_split`` is refused.

Only rank 0 prints progress and runs ``ModelCheckpoint``; every rank runs the other
callbacks on the same reduced logs (loss, metrics, validation), so EarlyStopping stops
every rank at the same epoch. Callbacks of your own that write files should check
``cylstm.distributed.rank()``.

Faults: a NaN/Inf loss on any rank is agreed on in the step's small reduction, and every
rank raises FloatingPointError at the same step. Any other exception on one rank (a bad
batch, Ctrl-C, a failing callback) is printed with the rank's traceback and ends every
rank with ``comm.Abort(1)`` at once, instead of leaving the others waiting in a
collective. Checkpoints are written atomically, so the last one stays loadable; resume
with ``cylstm.load(path)`` and ``fit(..., initial_epoch=k, distributed="mpi")``.

Inference (needs the ``dask`` extra): ``predict(model, x)`` with x a dask array.
"""

import math
import sys
import time
import traceback
import zlib

import numpy as np

from .callbacks import Callback, ModelCheckpoint
from .layers import LSTM, Dropout, _ragged_order
from .model import Stats
from ._check import positive_int as _positive_int

__all__ = ["MPI", "rank", "size", "shard_rows", "predict"]


def _mpi():
    try:
        from mpi4py import MPI as _M
    except ImportError as e:
        raise ImportError("distributed='mpi' needs mpi4py and an MPI library: "
                          "pip install \"cylstm[mpi]\"") from e
    return _M


class MPI:
    """How to train across MPI ranks: ``comm`` (None: ``MPI.COMM_WORLD``) and ``data``:
    "replicated" (every rank passes the whole data set) or "sharded" (rank r passes the
    rows ``shard_rows(N, r, size)``); see the module docstring."""

    def __init__(self, comm=None, data="replicated"):
        if data not in ("replicated", "sharded"):
            raise ValueError(f"data must be 'replicated' or 'sharded', got {data!r}")
        if comm is not None and not (hasattr(comm, "Allreduce") and hasattr(comm, "Get_rank")):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        self.comm, self.data = comm, data

    def __repr__(self):
        return f"MPI(comm={self.comm!r}, data={self.data!r})"


def _spec(distributed):
    if isinstance(distributed, MPI):
        return distributed
    if isinstance(distributed, str):
        if distributed != "mpi":
            raise ValueError(f"distributed must be 'mpi', an mpi4py communicator or "
                             f"cylstm.distributed.MPI(...), got {distributed!r}")
        return MPI()
    if hasattr(distributed, "Allreduce") and hasattr(distributed, "Get_rank"):
        return MPI(distributed)
    raise TypeError(f"distributed must be 'mpi', an mpi4py communicator or "
                    f"cylstm.distributed.MPI(...), got {type(distributed).__name__}")


def rank(comm=None):
    """This process's rank in ``comm`` (COMM_WORLD); 0 without mpi4py."""
    try:
        return (_mpi().COMM_WORLD if comm is None else comm).Get_rank()
    except ImportError:
        return 0


def size(comm=None):
    """The number of ranks in ``comm`` (COMM_WORLD); 1 without mpi4py."""
    try:
        return (_mpi().COMM_WORLD if comm is None else comm).Get_size()
    except ImportError:
        return 1


def shard_rows(n, rank, size):
    """The slice of rows rank ``rank`` of ``size`` holds of an ``n``-row data set in
    ``data="sharded"`` training: contiguous, in rank order, sizes differing by at most 1."""
    n = _positive_int(n, "n", minimum=0)
    size = _positive_int(size, "size")
    rank = _positive_int(rank, "rank", minimum=0)
    if rank >= size:
        raise ValueError(f"rank must be < size ({size}), got {rank}")
    return slice(n * rank // size, n * (rank + 1) // size)


def _digest(*arrays):
    crc = 0
    for a in arrays:
        if a is not None:
            crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
    return crc


class _Cooperative(Exception):
    """Marks an error every rank raises at the same point (no abort needed)."""


class _RowStream:
    """Stands in for a layer's dropout generator while a batch is split across ranks.

    One process draws a mask for the whole batch (rows x steps x features) from the
    layer's stream. Each rank draws that same whole-batch mask from the same stream (so
    the stream advances identically everywhere) and keeps the rows of its share, in the
    order the layer holds them: every row gets the mask it gets in one process."""

    def __init__(self, run, gen, lstm):
        self.run, self.gen, self.lstm = run, gen, lstm

    def random(self, shape):
        B_g, pos, lengths_g, T_g, lengths_l = self.run.ctx
        shape = tuple(shape)
        if self.lstm:                      # (T, B, H), rows in the LSTM's ragged order
            full = (T_g, B_g) + shape[2:]
            rows = pos
            if lengths_l is not None:
                local = _ragged_order(lengths_l.astype(np.int32))
                if local is not None:
                    rows = rows[local]
            if lengths_g is not None:
                glob = _ragged_order(lengths_g.astype(np.int32))
                if glob is not None:
                    rows = np.argsort(glob)[rows]
            m = self.gen.random(full)
            return m[:shape[0], rows]
        full = (B_g,) + ((T_g,) + shape[2:] if len(shape) >= 3 else shape[1:])
        m = self.gen.random(full)[pos]
        return m[:, :shape[1]] if len(shape) >= 3 else m


def _dropout_layers(model):
    """(layer, attribute of its generator, is an LSTM) for the masks a step draws."""
    out = []
    for layer in model.layers:
        if isinstance(layer, LSTM) and layer.dropout > 0 and layer.num_layers > 1:
            out.append((layer, "_dropout_rng", True))
        elif isinstance(layer, Dropout) and layer.p > 0:
            out.append((layer, "_rng", False))
    return out


class _Run(Callback):
    """One distributed fit: the batches of this rank, the reductions, the fault rules."""

    def __init__(self, model, distributed):
        spec = _spec(distributed)
        self.comm = spec.comm if spec.comm is not None else _mpi().COMM_WORLD
        self.sharded = spec.data == "sharded"
        self.model = model
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.ctx = None
        self.synced = False
        self.allreduce_seconds = 0.0          # read by bench/scaling.py
        self.steps = 0
        if self.size > 1:
            for i, layer in enumerate(model.layers):
                # Their masks are drawn per local row and per call; split across ranks
                # they would neither match one process nor stay in step between ranks.
                if getattr(layer, "recurrent_dropout", 0) or getattr(layer, "weight_dropout", 0):
                    raise ValueError(f"layers[{i}] ({layer!r}) uses recurrent_dropout or "
                                     f"weight_dropout, which distributed training does not "
                                     f"support yet; train it in one process")
            _abort_on_uncaught(self.comm)

    # ---- collectives on small Python values: summed in rank order, same on every rank

    def _sum(self, values):
        rows = self.comm.allgather(tuple(values))
        total = list(rows[0])
        for r in rows[1:]:
            total = [a + b for a, b in zip(total, r)]
        return total

    def _agree(self, value, message):
        values = self.comm.allgather(value)
        if any(v != values[0] for v in values):
            raise ValueError(message.format(values=values))

    # ---- the step: Callback hooks -------------------------------------------------------

    def on_batch_begin(self, batch, logs):
        self.synced = False

    def on_gradients(self, batch, logs):
        if self.size == 1:                    # one rank: exactly the one-process run
            self.synced = True
            return
        real = self.weight
        loss, count = logs["loss"], logs["count"] if real else 0
        finite = math.isfinite(loss) or not real
        part = (count, loss * count if finite and real else 0.0,
                logs["correct"] if real else 0, logs["abs_err"] if real else 0.0,
                0 if finite else 1, logs["size"] if real else 0)
        C, sum_loss, correct, abs_err, bad, rows = self._sum(part)
        self.synced = True
        if bad or C == 0:
            logs["loss"] = float("nan")
            return
        g = self.model.flat_grads
        if real:
            g *= g.dtype.type(count / C)      # this share's weight in the global mean
        else:
            g[...] = 0                        # a stand-in row: contributes nothing
        t0 = time.perf_counter()
        self.comm.Allreduce(_mpi().IN_PLACE, g, op=_mpi().SUM)
        self.allreduce_seconds += time.perf_counter() - t0
        self.steps += 1
        logs.update(loss=sum_loss / C, count=C, correct=correct, abs_err=abs_err, size=rows)

    def on_epoch_end(self, epoch, logs):
        sums = self.comm.allgather(_digest(self.model.flat_params))
        if any(s != sums[0] for s in sums):
            raise _Cooperative(f"after epoch {epoch + 1} the ranks hold different weights "
                               f"(checksums {sums}); the run is not synchronous")

    def on_train_end(self, logs):
        self._restore_streams()

    # ---- dropout streams ----------------------------------------------------------------

    def on_epoch_begin(self, epoch, logs):
        # fit_batches has just given every layer this epoch's stream: wrap it.
        if self.size == 1:
            return
        self._wrapped = []
        for layer, attr, lstm in _dropout_layers(self.model):
            gen = getattr(layer, attr)
            if isinstance(gen, _RowStream):   # an unseeded model keeps its stream
                gen = gen.gen
            self._wrapped.append((layer, gen))
            layer.seed_streams(_RowStream(self, gen, lstm))

    def _restore_streams(self):
        for layer, gen in getattr(self, "_wrapped", ()):
            layer.seed_streams(gen)
        self._wrapped = []

    # ---- the loop -----------------------------------------------------------------------

    def _start(self):
        """Every rank starts from rank 0's weights and shuffling stream: a no-op for a
        seeded model (they agree already), and what makes an unseeded one train as one
        model (its dropout masks then differ per rank: valid, but not one process's)."""
        if self.size == 1:
            return
        model = self.model
        self.comm.Bcast(model.flat_params, root=0)
        state = self.comm.bcast(model._rng.bit_generator.state, root=0)
        model._rng.bit_generator.state = state

    def _loop(self, epoch_batches, n_batches, epochs, validate, callbacks, verbose,
              stateful, initial_epoch):
        self._start()
        callbacks = list(callbacks or [])
        if verbose not in (0, 1, 2):          # checked before rank 0 alone keeps it
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        if self.rank != 0:                    # rank 0 alone prints and writes files
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
            verbose = 0
        try:
            return self.model.fit_batches(epoch_batches, n_batches, epochs, validate,
                                          [self] + callbacks, verbose, stateful,
                                          initial_epoch)
        except BaseException as e:
            self._restore_streams()
            cooperative = isinstance(e, _Cooperative) or (
                isinstance(e, FloatingPointError) and self.synced)
            if cooperative:
                if isinstance(e, _Cooperative):
                    raise RuntimeError(str(e)) from None
                raise
            if self.size > 1:
                self._abort(e)
            raise

    def _abort(self, e):
        # Another rank may be waiting in a collective this rank will never reach: say
        # what happened here, then end every rank (a hang is worse than a hard stop).
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        sys.stderr.write(f"cylstm.distributed: rank {self.rank} of {self.size} failed; "
                         f"aborting all ranks.\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(1)

    def _reduce_stats(self, stats):
        s = Stats(self.model.loss)
        if stats is not None:
            part = (stats.sum_loss, stats.count, stats.correct, stats.abs_err)
        else:
            part = (0.0, 0, 0.0, 0.0)
        s.sum_loss, s.count, s.correct, s.abs_err = self._sum(part)
        return s

    def _set_ctx(self, B_g, pos, lengths_g, T_g, lengths_l):
        self.ctx = (B_g, pos, lengths_g, T_g, lengths_l)

    # ---- Sequential.fit -----------------------------------------------------------------

    def fit_arrays(self, x, y, lengths, val, batch_size, shuffle, epochs, callbacks,
                   verbose, initial_epoch):
        model, n = self.model, self.size
        N = len(x)
        if self.sharded:
            counts = self.comm.allgather(N)
            offset = sum(counts[:self.rank])
            N_g = sum(counts)
            self._agree(x.shape[1], "sharded data: every rank's x needs the same number of "
                                    "steps (pad to one T), got {values}")
            has_len = self.comm.allgather(lengths is not None)
            if any(has_len) and not all(has_len):
                raise ValueError("sharded data: pass lengths on every rank or on none")
            lengths_g = None
            if lengths is not None:
                lengths_g = np.concatenate(self.comm.allgather(lengths)).astype(np.int64)
        else:
            self._agree((N, x.shape[1:], _digest(x, y, lengths)),
                        "replicated data: every rank must pass the same x, y and lengths "
                        "(shape, checksum per rank: {values}); for a shard per rank use "
                        "distributed=cylstm.distributed.MPI(data='sharded')")
            offset, N_g, lengths_g = 0, N, lengths
        if N_g < 1:
            raise ValueError("the ranks hold no training rows between them")
        T_full = x.shape[1]

        def epoch_batches(epoch):
            for idx in model._batches(N_g, batch_size, shuffle, lengths_g):
                B_g = len(idx)
                if self.sharded:
                    pos = np.flatnonzero((idx >= offset) & (idx < offset + N))
                else:
                    pos = np.arange(B_g * self.rank // n, B_g * (self.rank + 1) // n)
                self.weight = len(pos) > 0
                if not self.weight:           # nothing of this batch here: a stand-in row
                    pos = np.zeros(1, np.int64)
                    local = np.zeros(1, np.int64)
                else:
                    local = idx[pos] - offset
                xb, yb, lb = model._take(local, x, y, lengths)
                lg = None if lengths_g is None else lengths_g[idx]
                T_g = T_full if lg is None else int(lg.max())
                self._set_ctx(B_g, pos, lg, T_g, lb)
                yield xb, yb, lb

        validate = self._validate_arrays(val, batch_size)
        self.weight = True
        return self._loop(epoch_batches, -(-N_g // batch_size), epochs, validate, callbacks,
                          verbose, False, initial_epoch)

    def _validate_arrays(self, val, batch_size):
        has = self.comm.allgather(val is not None)
        if any(has) and not all(has):
            raise ValueError("validation data must be passed on every rank or on none")
        if val is None:
            return lambda: None
        xv, yv, lv = val
        if not self.sharded:                  # each rank evaluates its contiguous part
            part = slice(len(xv) * self.rank // self.size,
                         len(xv) * (self.rank + 1) // self.size)
            xv, yv, lv = xv[part], yv[part], None if lv is None else lv[part]

        def validate():
            stats = self.model._evaluate_arrays(xv, yv, lv, batch_size) if len(xv) else None
            return self._reduce_stats(stats)
        return validate

    # ---- cylstm.text.fit_text -----------------------------------------------------------

    def fit_streams(self, batches, val_ids, batch_size, seq_len, epochs, callbacks, verbose,
                    initial_epoch):
        from .text import _evaluate_streams
        n = self.size
        if batch_size < n:
            raise ValueError(f"batch_size ({batch_size} streams) must be at least the "
                             f"number of ranks ({n}): each rank carries whole streams")
        first = batches[0][0]
        self._agree((len(batches), first.shape, _digest(first)),
                    "fit_text: every rank must pass the same train_ids ({values})")
        rows = slice(batch_size * self.rank // n, batch_size * (self.rank + 1) // n)
        pos = np.arange(batch_size)[rows]
        self.weight = True

        def epoch_batches(epoch):
            for x, y in batches:
                self._set_ctx(batch_size, pos, None, x.shape[1], None)
                yield x[rows], y[rows], None

        def validate():
            if val_ids is None:
                return None
            return self._reduce_stats(_evaluate_streams(self.model, val_ids, batch_size,
                                                        seq_len, rows))
        return self._loop(epoch_batches, len(batches), epochs, validate, callbacks, verbose,
                          True, initial_epoch)


_hooked = set()


def _abort_on_uncaught(comm):
    """An exception nobody catches on one rank (say while preparing its data, before any
    collective) must not leave the other ranks waiting: print it, then abort them all."""
    if id(comm) in _hooked:
        return
    _hooked.add(id(comm))
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        comm.Abort(1)
    sys.excepthook = hook


# ---- Dask batch inference ---------------------------------------------------------------

def _predict_block(model, x, lengths=None, batch_size=256, threads=None):
    from ._threads import threads as _threads
    with _threads(threads):
        return model.predict(x, batch_size=batch_size, lengths=lengths)


def _aligned(chunks, batch_size):
    """Chunks along the rows that are whole multiples of batch_size (the last may be
    shorter), about the size of the first given chunk."""
    N = sum(chunks)
    k = max(1, round(chunks[0] / batch_size)) * batch_size
    out = [k] * (N // k)
    if N % k:
        out.append(N % k)
    return tuple(out)


def predict(model, x, batch_size=256, lengths=None, threads=None):
    """``model.predict`` over a dask array x (N, T, F), or (N, T) token ids, chunked
    along N; returns a lazy dask array of the outputs, computed on whatever scheduler is
    active (threads, processes, a ``dask.distributed`` Client).

    The rows are rechunked to whole multiples of ``batch_size`` (close to x's first
    chunk), so each chunk forms exactly the batches ``model.predict(x, batch_size)``
    forms on the whole array: the result is bitwise the one-process result whatever
    the BLAS kernel does with a row's place in a batch. ``lengths``: (N,) integers for
    ragged data (a dask or NumPy array; rechunked alike). Under a Client the model is
    scattered to every worker once (broadcast); otherwise it is one graph key (the
    threaded scheduler shares it; the local "processes" scheduler pickles a task's
    inputs with each task, so prefer a Client for many chunks of a large model);
    ``threads``: the cylstm thread count each task uses (None: all usable cores)."""
    import dask
    import dask.array as da
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask.array (N, T, F) or (N, T) chunked along N, got "
                        f"{type(x).__name__}; for a NumPy array call model.predict")
    batch_size = _positive_int(batch_size, "batch_size")
    if threads is not None:
        threads = _positive_int(threads, "threads")
    want = 2 if model.token_input else 3
    if x.ndim != want:
        raise ValueError(f"x must have shape {'(N, T)' if want == 2 else '(N, T, F)'}, "
                         f"got {x.shape}")
    if any(len(c) != 1 for c in x.chunks[1:]):
        x = x.rechunk({i: -1 for i in range(1, x.ndim)})
    rows = _aligned(x.chunks[0], batch_size)
    x = x.rechunk({0: rows})
    if lengths is not None:
        if not isinstance(lengths, da.Array):
            lengths = np.asarray(lengths)
            if lengths.shape != (x.shape[0],):
                raise ValueError(f"lengths must have shape ({x.shape[0]},), got "
                                 f"{lengths.shape}")
            lengths = da.from_array(lengths, chunks=(rows,))
        elif lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must have shape ({x.shape[0]},), got {lengths.shape}")
        lengths = lengths.rechunk((rows,))
    # One row through the model tells the output's trailing shape and dtype.
    probe = np.zeros((1, 1) + tuple(x.shape[2:]), np.int64 if model.token_input else
                     model.dtype)
    out1 = model.predict(probe, batch_size=1)
    trailing = out1.shape[1:]
    if model.sequence_output:
        trailing = (x.shape[1],) + trailing[1:]
    try:
        from distributed import default_client
        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        shipped = client.scatter(model, broadcast=True, hash=False)
    else:
        shipped = dask.delayed(model, pure=False)
    ind = "ijk"[:x.ndim]
    out_ind = "i" + "uvw"[:len(trailing)]
    args = [x, ind] + ([lengths, "i"] if lengths is not None else [])

    def block(xb, lb=None, *, model):
        return _predict_block(model, xb, lb, batch_size, threads)

    return da.blockwise(block, out_ind, *args, model=shipped,
                        new_axes=dict(zip(out_ind[1:], trailing)), concatenate=True,
                        dtype=out1.dtype, meta=np.empty((0,) * len(out_ind), out1.dtype))
