"""The LSTM module: torch.nn.LSTM's API, parameters in one arena, NumPy in and out."""

import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _lstm, _ops, _parallel, _step, _threads
from . import functional as F
from ._check import float_dtype as _dtype
from ._check import positive_int as _positive_int
from ._check import checkpoint_every as _checkpoint_every
from ._check import out_array, probability, real_array, shape_str
from .base import Features, Layer, Parametrised
from .embedding import TokenBatch
from ._threads import (N_PARTS, blas_single_threaded, get_num_threads, numpy_hugepage_hint_off,
                       threads)

__all__ = ["LSTM", "LSTMState", "Linear", "Dropout", "LastStep"]


def _ragged_order(lengths):
    """A batch order for ragged lengths, or None when there is nothing to gain.

    The kernels cut the batch into N_PARTS contiguous chunks (one per thread) and run a
    step's products over a chunk's rows up to its last running row (_active_end in
    _lstm.pyx). With each chunk sorted by decreasing length, those are exactly the
    running rows, so finished sequences cost nothing; dealing the rows sorted by length
    to the chunks in turn keeps the chunks' work equal. A row's numbers do not depend on
    its place in the batch (tests/test_module.py checks outputs and states bitwise);
    weight gradients sum the rows in another order, so they agree to rounding."""
    B = lengths.shape[0]
    if B < 2 or lengths.min() == lengths.max():
        return None
    n = min(B, N_PARTS)
    bounds = [B * p // n for p in range(n + 1)]           # the kernels' _split
    room = [bounds[p + 1] - bounds[p] for p in range(n)]
    chunks = [[] for _ in range(n)]
    p = 0
    for b in np.argsort(-lengths, kind="stable"):
        while len(chunks[p]) == room[p]:
            p = (p + 1) % n
        chunks[p].append(b)
        p = (p + 1) % n
    order = np.concatenate(chunks)
    if np.array_equal(order, np.arange(B)):
        return None
    return order


_pool = None
_pool_lock = threading.Lock()
_live_lstms = weakref.WeakSet()         # every LSTM, for the fork hook below


def _after_fork_in_child():
    # Only the forking thread exists in a forked child. The executor object survives
    # without its thread (submitting to it would wait forever), and a lock another
    # thread held at fork would never be released: the child starts both afresh, and
    # drops the spare workspaces a call in such a thread may have been handing back.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()
    for lstm in list(_live_lstms):
        lstm._workspaces_lock = threading.Lock()
        lstm._training_lock = threading.Lock()
        lstm._spare_workspaces = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _both_directions(run):
    """[run(0), run(1)], the two directions of a bidirectional layer.

    They are independent, so with two or more threads they run concurrently, each with
    half of the threads: each direction's time loop then runs on its own core, its
    weights in that core's cache (on 2 cores, a medium forward takes about 20% less
    time than the directions one after the other). With two threads the pair is a team
    of two OpenMP threads (_parallel.run_pair); with more, the reverse direction runs
    in a Python helper thread (kernels release the GIL) with its own team. Results are
    bitwise the same either way.
    """
    n = get_num_threads()
    if n < 2:
        return [run(0), run(1)]
    if n == 2:
        # one thread each, on a team of two of this thread's own OpenMP pool rather
        # than in a Python helper thread, which this thread's pool worker (spinning
        # after the last region) would compete with for the second core
        # (_parallel.run_pair)
        def one(d):
            with threads(1):
                return run(d)
        return _parallel.run_pair(lambda: one(0), lambda: one(1))
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cylstm-reverse")
    n0 = n // 2

    def reverse():
        with threads(n - n0):
            return run(1)

    future = _pool.submit(reverse)
    try:
        with threads(n0):
            first = run(0)
    finally:
        second = future.result()      # always joined, so no work outlives the call
    return [first, second]


class _Prepared:
    """An eval-mode forward of one input layout, prepared.

    Why: a short sequence's kernels cost less than the checks and decisions around them
    (the tiny config, B = 1, T = 50, H = 64: about a third of a call was Python). The
    general path (LSTM._forward) checks everything and records, per layer and
    direction, the keyword arguments it passed to the kernel (functional's
    ``_prepare``): the checked weights, every policy decision (input in the step or
    before the loop, packing, scratch) and the scratch arrays of its workspace set. A
    later call with the same key (the input's shape and strides, and everything else
    those decisions read) and the same parameter arrays fills in its own x, y, h, c and
    the bias sum b_ih + b_hh (recomputed: weights change in place) and calls the
    kernels directly: the same kernels on the same arguments, so the same bits.
    Anything else goes the general way, which prepares anew. It lives in an inference
    workspace set, which one call owns while it runs.
    """

    __slots__ = ("key", "weights", "calls", "biases", "__weakref__")

    def __init__(self, key, weights, calls, biases):
        self.key = key            # LSTM._prepared_key
        self.weights = weights    # [(name, array)]: the parameter arrays the calls read
        self.calls = calls        # [layer][direction] -> the kernel's keyword arguments
        self.biases = biases      # [layer * D + direction] -> (b_ih, b_hh) or None

    def current(self, params):
        for name, a in self.weights:
            if params.get(name) is not a:
                return False
        return True

    def run(self, lstm, xt, h0, c0):
        """(y, (h_n, c_n)) for xt (T, B, I) time-major, h0 (L*D, B, Hp) and c0 or None."""
        L, D, H, Hp, dtype = (lstm.num_layers, lstm.num_directions, lstm.hidden_size,
                              lstm.state_size, lstm.dtype)
        T, B, _ = xt.shape
        result = np.empty((B, T, D * Hp) if lstm.batch_first else (T, B, D * Hp), dtype)
        final = result.transpose(1, 0, 2) if lstm.batch_first else result
        h_n = np.zeros((L * D, B, Hp), dtype) if h0 is None else np.array(h0, dtype)
        c_n = np.zeros((L * D, B, H), dtype) if c0 is None else np.array(c0, dtype)
        inp = xt
        for layer in range(L):
            out = final if layer == L - 1 else np.empty((T, B, D * Hp), dtype)

            def run(d, layer=layer, inp=inp, out=out):
                kw, k = self.calls[layer][d], layer * D + d
                if self.biases[k] is not None:
                    np.add(*self.biases[k], out=kw["bias"])
                kw.update(x=inp, y=out[:, :, d * Hp:(d + 1) * Hp], h=h_n[k], c=c_n[k])
                try:
                    with F.blas_single_threaded:
                        _lstm.lstm_forward(**kw)
                finally:        # hold no caller's array until the next call
                    kw.update(x=None, y=None, h=None, c=None)
            if D == 1:
                run(0)
            else:
                _both_directions(run)
            inp = out
        return result, (h_n, c_n)


class LSTM(Parametrised):
    """A multi-layer LSTM with exactly ``torch.nn.LSTM``'s semantics, shapes and names.

    ``y, (h_n, c_n) = lstm(x, state=None, lengths=None)``
        x (T, B, I), or (B, T, I) with ``batch_first``, or unbatched (T, I);
        state (h0, c0): h0 (L*D, B, Hp), c0 (L*D, B, H), or None (zeros);
        lengths (B,) in 1..T for PyTorch's packed semantics (outputs zero and the state
        frozen past a sequence's length). y (T, B, D*Hp); h_n (L*D, B, Hp); c_n (L*D, B, H).
        L = num_layers, D = 2 if bidirectional else 1, Hp = proj_size or hidden_size.
    ``dx, (dh0, dc0) = lstm.backward(dy, dstate=None)``
        after a training-mode forward: dy like y, dstate (dh_n, dc_n) like the state or
        None; *accumulates* into ``lstm.grads`` (call ``zero_grad()`` between steps).
        dy is read in place wherever its last axis is contiguous; with ``batch_first``
        dx is a (B, T, I) view of the kernels' time-major array (``np.ascontiguousarray``
        it if you need that layout).
    ``state = lstm.initial_state(B)``; ``y_t = lstm.step(x_t, state)``
        streaming inference, one time step at a time (unidirectional models).

    Parameters live in one contiguous array (``lstm.flat_params``), gradients in another
    (``lstm.flat_grads``); ``lstm.params`` / ``lstm.grads`` are dicts of views into them
    with PyTorch's names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0``, ``weight_hr_l0``, ``..._reverse``). ``load_state_dict`` copies into
    the views. Dropout (between layers, training only) is inverted and drawn from its own
    random stream, so the same ``seed`` gives the same weights and the same masks.
    ``recurrent_dropout`` (variational dropout on h_{t-1} in the recurrent product, one
    (B, Hp) mask per sequence, layer and direction held for every step) and
    ``weight_dropout`` (DropConnect on each W_hh, one mask per forward call) are
    inverted too, training only, and drawn from the same stream (docs/math.md,
    "Recurrent dropout and weight dropout").
    ``checkpoint_every`` (None, k >= 1 or ``"auto"``, about sqrt(T)): checkpointed BPTT.
    A training forward keeps each layer's state every k steps (rounded up to whole time
    blocks, ``cylstm.functional.segment_steps``) instead of every step's cache, and
    backward recomputes each segment just before it needs it: memory grows with sqrt(T)
    instead of T, for about one more forward of time; the gradients are bitwise those of
    the full cache (docs/math.md, "Checkpointed BPTT").
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype="float32", seed=None,
                 recurrent_dropout=0.0, weight_dropout=0.0, checkpoint_every=None):
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.proj_size = _positive_int(proj_size, "proj_size", minimum=0)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size ({self.hidden_size}), "
                             f"got {self.proj_size}")
        self.dropout = probability(dropout, "dropout")
        self.recurrent_dropout = probability(recurrent_dropout, "recurrent_dropout")
        self.weight_dropout = probability(weight_dropout, "weight_dropout")
        self.checkpoint_every = _checkpoint_every(checkpoint_every)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.dtype = _dtype(dtype)
        self.training = True
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        self._init_rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(dropout_seq)

        # One arena for parameters, one for gradients (llm.c); named views into both.
        self._layout = []                      # (name, shape) in PyTorch's order
        H, Hp, D, P = self.hidden_size, self.state_size, self.num_directions, self.proj_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else Hp * D
            for d in range(D):
                sfx = self._suffix(layer, d)
                self._layout += [(f"weight_ih{sfx}", (4 * H, in_size)),
                                 (f"weight_hh{sfx}", (4 * H, Hp))]
                if self.bias:
                    self._layout += [(f"bias_ih{sfx}", (4 * H,)), (f"bias_hh{sfx}", (4 * H,))]
                if P:
                    self._layout += [(f"weight_hr{sfx}", (P, H))]
        self._make_arena()
        self._workspaces = {}                  # (layer, direction) -> F.Workspace
        self._caches = None                    # what backward needs from the last forward
        # Inference calls take a set of workspaces from this pool and put it back, so
        # concurrent calls from several Python threads never share scratch (the pool
        # grows to the number of simultaneous calls). Training uses _workspaces (the
        # cache lives in it) under _training_lock: one training call at a time.
        self._spare_workspaces = []
        self._workspaces_lock = threading.Lock()
        self._training_lock = threading.Lock()
        _live_lstms.add(self)
        self.reset_parameters()

    def __getstate__(self):
        # copy.deepcopy / pickle: locks cannot be copied, and workspaces and the cache
        # are scratch; the copy starts with fresh ones (and no cache: forward again
        # before backward).
        d = super().__getstate__()
        for key in ("_workspaces_lock", "_training_lock"):
            d.pop(key, None)
        d["_workspaces"], d["_caches"], d["_spare_workspaces"] = {}, None, []
        return d

    def __setstate__(self, d):
        super().__setstate__(d)
        # pickles made before these options existed mean "off"
        self.__dict__.setdefault("recurrent_dropout", 0.0)
        self.__dict__.setdefault("weight_dropout", 0.0)
        self.__dict__.setdefault("checkpoint_every", None)
        self._workspaces_lock = threading.Lock()
        self._training_lock = threading.Lock()
        _live_lstms.add(self)

    # ---- bookkeeping ---------------------------------------------------------------------

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def state_size(self):
        """Features of h and of each direction's output: proj_size if set, else hidden_size."""
        return self.proj_size or self.hidden_size

    @staticmethod
    def _suffix(layer, d):
        return f"_l{layer}" + ("_reverse" if d else "")

    def __repr__(self):
        extra = "".join(f", {k}={getattr(self, k)!r}" for k, default in (
            ("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
            ("bidirectional", False), ("proj_size", 0), ("recurrent_dropout", 0.0),
            ("weight_dropout", 0.0), ("checkpoint_every", None))
            if getattr(self, k) != default)
        return (f"cylstm.LSTM({self.input_size}, {self.hidden_size}{extra}, "
                f"dtype='{self.dtype}')")

    def reset_parameters(self):
        """PyTorch's default: every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for name, _ in self._layout:
            p = self.params[name]
            p[...] = self._init_rng.uniform(-k, k, size=p.shape)

    # ---- the layer interface (cylstm.base.Layer) --------------------------------------

    recurrent = True

    @property
    def init_fan(self):
        return self.hidden_size

    def init_roles(self):
        roles = {"weight_ih": "weight", "weight_hh": "recurrent", "weight_hr": "weight",
                 "bias_ih": "forget_bias", "bias_hh": "bias"}
        return [(name, roles[name.split("_l")[0]]) for name, _ in self._layout]

    def seed_streams(self, rng):
        self._dropout_rng = rng

    def connect(self, spec):
        if spec is not None:
            if not spec.per_step:
                raise ValueError(f"{self!r} needs a sequence (B, T, F), but the layer before "
                                 f"gives one vector per sequence")
            if spec.size is not None and spec.size != self.input_size:
                raise ValueError(f"{self!r} takes {self.input_size} features but the layer "
                                 f"before gives {spec.size}")
        Hp = self.state_size
        return Features(self.num_directions * Hp, Hp if self.bidirectional else 0, True)

    @property
    def takes_token_batch(self):
        """True: forward_batch takes an Embedding's TokenBatch (not for a subclass with
        its own forward_batch or backward_batch, which expect arrays)."""
        cls = type(self)
        return cls.forward_batch is LSTM.forward_batch and cls.backward_batch is LSTM.backward_batch

    def forward_batch(self, x, lengths=None, state=None):
        """Batch-first x (B, T, I) whatever ``batch_first`` says -> (y (B, T, D*Hp), (h, c)).
        x may be an Embedding's TokenBatch (B, T): then, where ``F.token_table`` says it
        pays, the first layer projects the Embedding's table instead of its output, and
        backward accumulates the Embedding's gradient (returning None); else the ids are
        embedded first."""
        if isinstance(x, TokenBatch):
            B, T = x.shape
            emb = x.embedding
            # (a subclass with its own forward or backward gets the embedded x)
            if (emb.dtype == self.dtype and emb.embedding_dim == self.input_size
                    and type(self).forward is LSTM.forward
                    and type(self).backward is LSTM.backward
                    and F.token_table(emb.num_embeddings, T, B, self.input_size)):
                with numpy_hugepage_hint_off:
                    y, hc = self._forward(None, state, lengths, tokens=x)
                return (y if self.batch_first else y.transpose(1, 0, 2)), hc
            x = x.embed()
        y, hc = self.forward(x if self.batch_first else x.transpose(1, 0, 2), state, lengths)
        return (y if self.batch_first else y.transpose(1, 0, 2)), hc

    def backward_batch(self, dy):
        dx, _ = self.backward(dy if self.batch_first else dy.transpose(1, 0, 2))
        if dx is None:                  # token input: the Embedding's gradient is done
            return None
        return dx if self.batch_first else dx.transpose(1, 0, 2)

    def train(self, mode=True):
        """Training mode: forward keeps the cache backward needs, dropout is active."""
        self.training = bool(mode)
        if not self.training:
            self._caches = None
            for ws in self._workspaces.values():
                ws.clear()                     # release the training caches' memory
        return self

    def eval(self):
        """Inference mode: forward keeps no cache, dropout is off."""
        return self.train(False)

    def get_config(self):
        """The constructor's arguments (JSON-able): ``LSTM(**config)`` rebuilds the shape."""
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                    dropout=self.dropout, bidirectional=self.bidirectional,
                    proj_size=self.proj_size, dtype=self.dtype.name,
                    recurrent_dropout=self.recurrent_dropout,
                    weight_dropout=self.weight_dropout,
                    checkpoint_every=self.checkpoint_every)

    def _weights(self, layer, d):
        """((w_ih, w_hh, b_ih, b_hh, w_hr), (their gradients)) of one layer and direction;
        biases and w_hr are None when the model has none."""
        sfx = self._suffix(layer, d)
        out = []
        for store in (self.params, self.grads):
            out.append((store[f"weight_ih{sfx}"], store[f"weight_hh{sfx}"],
                        store.get(f"bias_ih{sfx}"), store.get(f"bias_hh{sfx}"),
                        store.get(f"weight_hr{sfx}")))
        return out

    def _workspace(self, layer, d, workspaces=None):
        workspaces = self._workspaces if workspaces is None else workspaces
        ws = workspaces.get((layer, d))
        if ws is None:
            ws = workspaces[(layer, d)] = F.Workspace()
        return ws

    def _acquire_workspaces(self, training, what):
        """The workspaces one forward/backward call uses. Inference: a set of its own from
        the pool (threads may share a model in eval mode). Training: the model's set, the
        cache lives there; a second training call while one runs is a RuntimeError."""
        if training:
            if not self._training_lock.acquire(blocking=False):
                raise RuntimeError(
                    f"LSTM.{what}: another training-mode forward/backward of this model is "
                    "running in another thread; one model trains from one thread at a time "
                    "(inference in eval mode may run from many threads)")
            return self._workspaces
        with self._workspaces_lock:
            return self._spare_workspaces.pop() if self._spare_workspaces else {}

    def _release_workspaces(self, workspaces):
        if workspaces is self._workspaces:
            self._training_lock.release()
        else:
            with self._workspaces_lock:
                self._spare_workspaces.append(workspaces)

    def _inverted_mask(self, shape, p):
        """A mask of ``shape`` from the dropout stream: 1/(1-p) with probability 1-p, else 0."""
        keep = 1.0 - p
        return (self._dropout_rng.random(shape) < keep).astype(self.dtype) / self.dtype.type(keep)

    def _dropped_w_hh(self, layer, d, ws):
        """(W_hh * mask, mask) for weight dropout, both in the direction's workspace: the
        arena's W_hh is never written, and the masked copy lives as long as the cache that
        references it (until the next training forward)."""
        (_, w_hh, _, _, _), _ = self._weights(layer, d)
        mask = ws.get("whh_drop_mask", w_hh.shape, self.dtype)
        mask[...] = self._inverted_mask(w_hh.shape, self.weight_dropout)
        dropped = ws.get("whh_dropped", w_hh.shape, self.dtype)
        np.multiply(w_hh, mask, out=dropped)
        return dropped, mask

    # ---- forward / backward --------------------------------------------------------------

    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def _state(self, state, name, B, unbatched):
        """Validated (h (L*D, B, Hp), c (L*D, B, H)) or (None, None)."""
        LD, H, Hp = self.num_layers * self.num_directions, self.hidden_size, self.state_size
        if state is None:
            return None, None
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{name} must be a pair (h, c) or None, got {type(state).__name__}")
        out = []
        for k, (part, size, a) in enumerate(zip("hc", (Hp, H), state)):
            shape = (LD, size) if unbatched else (LD, B, size)
            a = F._as_array(a, f"{name}[{k}] ({part})", self.dtype, shape)
            out.append(a[:, None, :] if unbatched else a)
        return out[0], out[1]

    def forward(self, x, state=None, lengths=None):
        """Run the whole sequence. Returns (y, (h_n, c_n)); see the class docstring."""
        # the output and the caches are fresh arrays of megabytes: NumPy's huge-page
        # hint would make their first touch wait for memory compaction (_threads)
        with numpy_hugepage_hint_off:
            return self._forward(x, state, lengths)

    def _prepared_key(self, xt):
        """What an eval-mode forward's kernel arguments depend on besides the parameters
        (_Prepared): the layout of the time-major input, and the settings the policies
        read (threads, ISA level, the step-weight budget, the test hooks of functional's
        rules)."""
        return (xt.shape, xt.strides, get_num_threads(), _lstm.rgemm_level(),
                F._FORCE_INPUT_IN_STEP, F.PACK_MIN_STEPS, F.N_PARTS,
                _threads.STEP_WEIGHT_BYTES, self.checkpoint_every)

    def _prepared(self, key, calls):
        """A _Prepared from the kernel arguments of each layer and direction (calls, in
        layer * D + direction order) of a general forward whose key was taken before its
        kernels ran, or None when the kernels did not read the parameter arrays
        themselves (a converted copy, which an identity check could not vouch for) or a
        bias is not a C-contiguous array of the model's dtype (its sum would round
        differently)."""
        D = self.num_directions
        weights, biases = [], []
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        for layer in range(self.num_layers):
            for d in range(D):
                kw = calls[layer * D + d]
                kw.update(x=None, y=None, h=None, c=None)   # hold no caller's array
                sfx = self._suffix(layer, d)
                arrays, _ = self._weights(layer, d)
                w_ih, w_hh, b_ih, b_hh, w_hr = arrays
                if (kw["w_ih"] is not w_ih or kw["w_hh"] is not w_hh
                        or kw["w_hr"] is not w_hr):
                    return None
                if b_ih is not None:
                    for b in (b_ih, b_hh):
                        if (type(b) is not np.ndarray or b.dtype != self.dtype
                                or not b.flags.c_contiguous):
                            return None
                weights += [(n + sfx, a) for n, a in zip(names, arrays) if a is not None]
                biases.append((b_ih, b_hh) if b_ih is not None else None)
        return _Prepared(key, weights,
                         [calls[layer * D:(layer + 1) * D] for layer in range(self.num_layers)],
                         biases)

    def _prepared_forward(self, x, state):
        """An eval-mode forward of x through the calls a general forward of the same
        layout prepared (_Prepared), or None when there are none (the caller then runs
        the general path, which checks everything and prepares them)."""
        if (type(x) is not np.ndarray or x.ndim != 3 or x.dtype != self.dtype
                or x.shape[2] != self.input_size):
            return None
        xt = x.transpose(1, 0, 2) if self.batch_first else x
        key = self._prepared_key(xt)
        wss = self._acquire_workspaces(False, "forward")
        try:
            plan = wss.get("prepared")
            if plan is None or plan.key != key or not plan.current(self.params):
                return None
            h0, c0 = self._state(state, "state", xt.shape[1], False)
            return plan.run(self, xt, h0, c0)
        finally:
            self._release_workspaces(wss)

    def _forward(self, x, state, lengths, tokens=None):
        """tokens: a TokenBatch (B, T) instead of x (None), from forward_batch."""
        if tokens is None and lengths is None and not self.training:
            got = self._prepared_forward(x, state)
            if got is not None:
                return got
        if tokens is not None:
            unbatched = False
            B, T = tokens.shape
            xt = None
        else:
            x = real_array(x, "x")
            unbatched = x.ndim == 2
            passed = x.shape                      # every message names the shape as passed
            want = "(B, T, I)" if self.batch_first else "(T, B, I)"
            if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
                raise ValueError(f"x must have shape {want} or unbatched (T, I) with "
                                 f"I = input_size = {self.input_size}, got {shape_str(passed)}")
            if unbatched:
                x = x[:, None, :]
                if lengths is not None:
                    raise ValueError("lengths needs batched input; unbatched x is one sequence")
            elif self.batch_first:
                x = x.transpose(1, 0, 2)
            # inference reads a (T, B, I) view in place when its last axis is contiguous
            # (a batch-first array, transposed); training keeps a C-contiguous x
            xt = (F._as_array(x, "x", self.dtype, (None, None, self.input_size))
                  if self.training else F._as_rows(x, "x", self.dtype, self.input_size))
            T, B, _ = xt.shape
            if T < 1 or B < 1:
                raise ValueError(f"x must have at least one step and one sequence, got "
                                 f"{shape_str(passed)}")
            if self.training and np.may_share_memory(xt, x):
                xt = xt.copy()   # the cache keeps x: never alias the caller's array
        full = lengths is None                # the kernels' layers then make their own
        if not full:
            lengths = F._lengths(lengths, T, B)
        h0, c0 = self._state(state, "state", B, unbatched)
        order = None if full else _ragged_order(lengths)
        if order is not None:     # the kernels skip finished rows of length-sorted chunks
            lengths = lengths[order]
            if h0 is not None:
                h0, c0 = h0[:, order], c0[:, order]
            if self.training and xt is not None:   # the cache keeps x in the kernels' order
                xt = xt[:, order]
        # inference runs the kernels' order in place: x and y stay in the caller's
        row_order = order if not self.training else None
        if tokens is not None:    # layer 0's input: the Embedding's table and these ids
            emb = tokens.embedding
            tok_ids = tokens.time_major(order if self.training else None)
            tok_pad = -1 if emb.padding_idx is None else emb.padding_idx

        L, D, H, Hp = self.num_layers, self.num_directions, self.hidden_size, self.state_size
        training = self.training
        # The last layer writes straight into the result, batch-first or not, each
        # direction into its half: no transposing or concatenating copy afterwards.
        # (Ragged batches trained in another order are reordered afterwards.)
        direct = (order is None or not training) and not unbatched
        if direct:
            result = np.empty((B, T, D * Hp) if self.batch_first else (T, B, D * Hp),
                              self.dtype)
            final = result.transpose(1, 0, 2) if self.batch_first else result
        # an eval-mode forward of full-length batched arrays prepares the next one of
        # the same layout (_Prepared): each kernel call's arguments, recorded
        prepare = [[] for _ in range(L * D)] if (
            not training and tokens is None and full and not unbatched) else None
        key = self._prepared_key(xt) if prepare is not None else None
        wss = self._acquire_workspaces(training, "forward")
        try:
            if training:
                self._caches = None       # its arrays are about to be overwritten
            h_n = np.empty((L * D, B, Hp), self.dtype)
            c_n = np.empty((L * D, B, H), self.dtype)
            caches, masks, wmasks = [], [], []
            inp = xt
            for layer in range(L):
                # Masks are drawn here, in one thread and a fixed order (per direction:
                # W_hh's, then h's), so the stream gives the same masks whatever runs
                # the directions. p = 0 draws nothing: the plain path, bitwise.
                w_hh_dropped, rmasks = [None] * D, [None] * D
                for d in range(D):
                    if training and self.weight_dropout > 0:
                        w_hh_dropped[d], wmask = self._dropped_w_hh(
                            layer, d, self._workspace(layer, d, wss))
                        wmasks.append(wmask)
                    if training and self.recurrent_dropout > 0:
                        # drawn in the caller's batch order: a sequence's mask does not
                        # depend on where the ragged reordering puts it
                        rmasks[d] = self._inverted_mask((B, Hp), self.recurrent_dropout)
                        if order is not None:
                            rmasks[d] = rmasks[d][order]
                out = (final if direct and layer == L - 1
                       else np.empty((T, B, D * Hp), self.dtype))
                def run(d, layer=layer, inp=inp, w_hh_dropped=w_hh_dropped, rmasks=rmasks,
                        out=out):
                    (w_ih, w_hh, b_ih, b_hh, w_hr), _ = self._weights(layer, d)
                    k = layer * D + d
                    y, h_n[k], c_n[k], cache = F.lstm_layer_forward(
                        inp, w_ih, w_hh if w_hh_dropped[d] is None else w_hh_dropped[d],
                        b_ih, b_hh,
                        None if h0 is None else h0[k], None if c0 is None else c0[k],
                        None if full else lengths, reverse=bool(d), training=training,
                        w_hr=w_hr,
                        recurrent_mask=rmasks[d], checkpoint_every=self.checkpoint_every,
                        workspace=self._workspace(layer, d, wss),
                        out=out[:, :, d * Hp:(d + 1) * Hp], row_order=row_order,
                        # one Tokens per direction: backward may point the reverse
                        # direction's at a scratch gradient (_backward)
                        tokens=(F.Tokens(tok_ids, emb.weight, emb.grad, tok_pad)
                                if layer == 0 and tokens is not None else None),
                        _prepare=None if prepare is None else prepare[k])
                    return y, cache
                results = [run(0)] if D == 1 else _both_directions(run)
                caches += [cache for _, cache in results]
                inp = out
                if training and self.dropout > 0 and layer < L - 1:
                    keep = 1.0 - self.dropout        # inverted dropout between layers only
                    mask = (self._dropout_rng.random(inp.shape) < keep).astype(self.dtype) / keep
                    inp = inp * mask
                    masks.append(mask)
            self._caches = ((caches, masks, wmasks, T, B, unbatched, order)
                            if training else None)
            if not training:
                # a call that prepared nothing drops the set's plan too: its scratch may
                # have been resized, and the plan would keep the old arrays alive
                wss["prepared"] = (self._prepared(key, [p[0] for p in prepare])
                                   if prepare is not None and all(len(p) == 1 for p in prepare)
                                   else None)
        finally:
            self._release_workspaces(wss)

        if direct:
            if order is not None:
                back = np.argsort(order)
                h_n, c_n = h_n[:, back], c_n[:, back]
            return result, (h_n, c_n)
        y = inp
        if order is not None:
            back = np.argsort(order)
            y, h_n, c_n = y[:, back], h_n[:, back], c_n[:, back]
        if unbatched:
            y, h_n, c_n = y[:, 0, :], h_n[:, 0, :], c_n[:, 0, :]
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        return np.ascontiguousarray(y), (h_n, c_n)

    def backward(self, dy, dstate=None):
        """Backpropagate through the last training-mode forward; accumulates into grads.

        dy like the forward's y; dstate (dh_n, dc_n) like its state, or None (zeros).
        Returns (dx, (dh0, dc0)) shaped like x and the state.
        """
        with numpy_hugepage_hint_off:          # as forward
            return self._backward(dy, dstate)

    def _backward(self, dy, dstate):
        if self._caches is None:
            raise RuntimeError("backward needs a forward in training mode first "
                               "(lstm.train(); y, state = lstm(x); lstm.backward(dy))")
        caches, masks, wmasks, T, B, unbatched, order = self._caches
        L, D, H, Hp = self.num_layers, self.num_directions, self.hidden_size, self.state_size
        # dy is read in place when its rows are (F._as_rows): a batch-first dy transposed
        if unbatched:
            dy = F._as_array(dy, "dy", self.dtype, (T, D * Hp))[:, None, :]
        elif self.batch_first:
            dy = F._as_rows(dy, "dy", self.dtype, D * Hp, (B, T)).transpose(1, 0, 2)
        else:
            dy = F._as_rows(dy, "dy", self.dtype, D * Hp, (T, B))
        dh_n, dc_n = self._state(dstate, "dstate", B, unbatched)
        if order is not None:     # the batch order of the forward's kernels
            dy = dy[:, order]
            if dh_n is not None:
                dh_n, dc_n = dh_n[:, order], dc_n[:, order]
        wss = self._acquire_workspaces(True, "backward")
        try:
            dh0 = np.empty((L * D, B, Hp), self.dtype)
            dc0 = np.empty((L * D, B, H), self.dtype)
            for layer in range(L - 1, -1, -1):
                if layer < L - 1 and masks:
                    dy = dy * masks[layer]
                def run(d, layer=layer, dy=dy):
                    k = layer * D + d
                    _, (dw_ih, dw_hh, db_ih, db_hh, dw_hr) = self._weights(layer, d)
                    ws = self._workspace(layer, d, wss)
                    dw_hh_into = dw_hh
                    if wmasks:
                        # gradient w.r.t. the masked copy into scratch, then only the
                        # kept weights receive it: dW_hh += dW_dropped * mask      (1w')
                        dw_hh_into = ws.get("dwhh_dropped", dw_hh.shape, self.dtype)
                        dw_hh_into[...] = 0
                    dyd = dy if D == 1 else dy[:, :, d * Hp:(d + 1) * Hp]   # read in place
                    dxd, dh0[k], dc0[k] = F.lstm_layer_backward(
                        caches[k], dyd, None if dh_n is None else dh_n[k],
                        None if dc_n is None else dc_n[k], dw_ih=dw_ih, dw_hh=dw_hh_into,
                        db_ih=db_ih, db_hh=db_hh, dw_hr=dw_hr, workspace=ws)
                    if wmasks:
                        np.multiply(dw_hh_into, wmasks[k], out=dw_hh_into)
                        dw_hh += dw_hh_into
                    return dxd
                tok_grad = None
                if D == 2 and caches[layer * D + 1].tokens is not None:
                    # Token input: both directions add to the Embedding's gradient, and
                    # they may run at once; the reverse one (its own Tokens) adds into a
                    # scratch first, added after, so the sum has one order.
                    tok = caches[layer * D + 1].tokens
                    tok_grad = tok.grad
                    tok.grad = self._workspace(layer, 1, wss).get(
                        "token_grad", tok_grad.shape, self.dtype)
                    tok.grad[...] = 0
                try:
                    dxs = [run(0)] if D == 1 else _both_directions(run)
                finally:
                    if tok_grad is not None:
                        tok_grad += tok.grad
                        tok.grad = tok_grad
                if dxs[0] is None:              # token input: no dx below
                    dy = None
                    break
                dy = dxs[0] if D == 1 else dxs[0] + dxs[1]
        finally:
            self._release_workspaces(wss)
        dx = dy                   # None after token input
        if order is not None:
            back = np.argsort(order)
            dh0, dc0 = dh0[:, back], dc0[:, back]
            if dx is not None:
                dx = dx[:, back]
        if unbatched:
            return dx[:, 0, :], (dh0[:, 0, :], dc0[:, 0, :])
        if self.batch_first and dx is not None:   # a view: the layer below reads it in place
            dx = dx.transpose(1, 0, 2)
        return dx, (dh0, dc0)

    # ---- streaming inference -------------------------------------------------------------

    def initial_state(self, batch, state=None):
        """A fresh LSTMState for ``batch`` sequences (zeros, or a copy of ``state``)."""
        if self.bidirectional:
            raise ValueError("step() needs a unidirectional LSTM: the reverse direction "
                             "of a bidirectional one reads the future")
        return LSTMState(self, _positive_int(batch, "batch"), state)

    def step(self, x_t, state):
        """One time step for a batch of streams: x_t (B, I) -> y_t (B, Hp).

        Updates ``state`` (from ``initial_state``) in place and matches running the whole
        sequence to rounding (not bitwise: a sequence sums a step's products in another
        order, see docs/math.md). Inference only (no
        dropout, no cache). The returned array is a buffer of ``state``, overwritten by the next
        call: copy it to keep it.
        """
        if not isinstance(state, LSTMState) or state.model is not self:
            raise TypeError("state must come from this model's initial_state(batch)")
        if self.bidirectional:
            raise ValueError("step() needs a unidirectional LSTM: the reverse direction "
                             "of a bidirectional one reads the future")
        # One compiled call runs every layer (_step.StepRunner, built by the first step
        # of a state), on the weights in place; it checks x_t itself, so the common case
        # costs no conversion here, and it holds BLAS to one thread itself.
        runner = state._runner
        if runner is not None:
            y = runner.run(x_t, self.params, state.h, state.c, N_PARTS, get_num_threads())
            if y is not None and y is not NotImplemented:
                return y
        x_t = F._as_array(x_t, "x_t", self.dtype, state._x_shape)
        if runner is not None:
            y = runner.run(x_t, self.params, state.h, state.c, N_PARTS, get_num_threads())
            if y is not None and y is not NotImplemented:
                return y
        # first step, or a weight / h / c array was replaced: (re)build the runner
        keys = [[k if k in self.params else None for k in (
            f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}",
            f"weight_hr{sfx}")] for sfx in (self._suffix(l, 0) for l in range(self.num_layers))]
        state._runner = runner = _step.StepRunner(
            keys, self.params, state.h, state.c, state._y, self.input_size,
            self.hidden_size, self.proj_size, self.dtype)
        y = runner.run(x_t, self.params, state.h, state.c, N_PARTS, get_num_threads())
        if y is None or y is NotImplemented:           # a fresh runner on a converted x_t
            raise RuntimeError("cylstm: the compiled step refused its own arguments")
        return y

    def load_keras_weights(self, weights, layer=0, ignore_go_backwards=False):
        """``load_state_dict``'s sibling for Keras 3: a Keras LSTM or Bidirectional layer
        (or its ``get_weights()`` list) into layer ``layer``; see ``cylstm.keras``."""
        from .keras import load_lstm_weights
        return load_lstm_weights(self, weights, layer, ignore_go_backwards)


class LSTMState:
    """Streaming state of an LSTM: ``h`` (L, B, Hp) and ``c`` (L, B, H), updated in place
    by ``LSTM.step``, plus the buffers a step needs (so a step allocates no arrays)."""

    def __init__(self, model, batch, state=None):
        L, H, Hp, dt = model.num_layers, model.hidden_size, model.state_size, model.dtype
        self.model, self.batch = model, batch
        self.h = np.zeros((L, batch, Hp), dt)
        self.c = np.zeros((L, batch, H), dt)
        if state is not None:
            h0, c0 = model._state(state, "state", batch, False)
            self.h[...], self.c[...] = h0, c0
        self._y = np.empty((L, 1, batch, Hp), dt)
        self._x_shape = (batch, model.input_size)
        self._runner = None                    # _step.StepRunner, built by the first step

    def __getstate__(self):
        # copy/deepcopy/pickle: the runner holds raw pointers into this object's arrays,
        # so a copy builds its own on its first step
        d = self.__dict__.copy()
        d["_runner"] = None
        return d

    def reset(self):
        """Zero the state (start new streams)."""
        self.h[...] = 0
        self.c[...] = 0


# ---------------------------------------------------------------------------------------
# The other layers of a model: Linear, Dropout, LastStep. Each has forward(x) /
# backward(dy) -> dx, train()/eval(), and, when it has parameters, an arena
# (flat_params, flat_grads) with named views (params, grads) like the LSTM's.
# ---------------------------------------------------------------------------------------

def _features(x, name, dtype, size):
    """x as a C-contiguous ``dtype`` array of shape (..., size), at least 1-D."""
    x = real_array(x, name)
    if x.ndim < 1 or x.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}), got {shape_str(x)}")
    return np.ascontiguousarray(x, dtype=dtype)


class Linear(Parametrised):
    """y = x W^T + b over the last axis, as ``torch.nn.Linear``: x (..., in) -> (..., out).

    ``params``/``grads``: {"weight" (out, in), "bias" (out,)} views into the arenas
    ``flat_params``/``flat_grads``. Initialised as PyTorch does: weight and bias uniform
    in [-1/sqrt(in), 1/sqrt(in)], from ``seed``. ``backward(dy)`` accumulates into
    ``grads`` and returns dx; the products run in cylstm's compiled kernels over all leading
    axes at once.
    """

    def __init__(self, in_features, out_features, bias=True, dtype="float32", seed=None):
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.bias = bool(bias)
        self.dtype = _dtype(dtype)
        self.training = True
        self._layout = [("weight", (self.out_features, self.in_features))]
        if self.bias:
            self._layout.append(("bias", (self.out_features,)))
        self._make_arena()
        self._rng = np.random.default_rng(seed)
        self._x = None                    # (N, in): the last training forward's input
        self.reset_parameters()

    def reset_parameters(self):
        """PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        k = 1.0 / math.sqrt(self.in_features)
        for name, shape in self._layout:
            self.params[name][...] = self._rng.uniform(-k, k, size=shape)

    def get_config(self):
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias, dtype=self.dtype.name)

    @property
    def init_fan(self):
        return self.in_features

    def init_roles(self):
        return [(name, "bias" if name == "bias" else "weight") for name, _ in self._layout]

    def connect(self, spec):
        if spec is not None and spec.size is not None and spec.size != self.in_features:
            raise ValueError(f"{self!r} takes {self.in_features} features but the layer "
                             f"before gives {spec.size}")
        return Features(self.out_features, 0, True if spec is None else spec.per_step)

    def train(self, mode=True):
        if not mode:
            self._x = None                # eval keeps no input for a backward
        return super().train(mode)

    def forward(self, x, out=None):
        """x (..., in) -> y (..., out). ``out``: an optional writeable C-contiguous array
        of y's shape and dtype, not overlapping x, that receives y (and is returned):
        ``Sequential.predict`` has the logits written straight into its result."""
        x = _features(x, "x", self.dtype, self.in_features)
        x2 = x.reshape(-1, self.in_features)
        if out is None:
            y = np.empty((x2.shape[0], self.out_features), self.dtype)
        else:
            out_array(out, x.shape[:-1] + (self.out_features,), self.dtype, x,
                      "x (the kernel reads x while it writes out)")
            y = out.reshape(x2.shape[0], self.out_features)
        # cylstm's kernel, not NumPy's matmul: NumPy's own BLAS threads would compete
        # with cylstm's OpenMP team for the same cores (see _ops.pyx, Linear)
        with blas_single_threaded:
            _ops.linear_forward(out=y, x=x2, weight=self.params["weight"],
                                bias=self.params["bias"] if self.bias else None,
                                n_parts=N_PARTS, n_threads=get_num_threads())
        self._x = x2 if self.training else None
        self._lead = x.shape[:-1]
        return out if out is not None else y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, dy):
        """dy (..., out) like the forward's y -> dx (..., in); grads += (dW, db)."""
        if self._x is None:
            raise RuntimeError("Linear.backward() needs a forward() in training mode first")
        want = self._lead + (self.out_features,)
        dy = _features(dy, "dy", self.dtype, self.out_features)
        if dy.shape != want:
            raise ValueError(f"dy must have shape {want} (the forward output's), "
                             f"got {shape_str(dy)}")
        dy2 = dy.reshape(-1, self.out_features)
        dx = np.empty((dy2.shape[0], self.in_features), self.dtype)
        with blas_single_threaded:
            _ops.linear_backward(dx=dx, dweight=self.grads["weight"],
                                 dbias=self.grads["bias"] if self.bias else None,
                                 scratch=np.empty(self.out_features), dy=dy2, x=self._x,
                                 weight=self.params["weight"], n_parts=N_PARTS,
                                 n_threads=get_num_threads(),
                                 own_wide=_threads.BACKWARD_OWN_WIDE)
        return dx.reshape(self._lead + (self.in_features,))

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}"
                f"{'' if self.bias else ', bias=False'}, dtype='{self.dtype}')")


class Dropout(Layer):
    """Inverted dropout, as ``torch.nn.Dropout``: in training each element is zeroed with
    probability p and the rest scaled by 1/(1-p); in eval mode the identity. The mask
    comes from the layer's own generator (``seed``), so a seeded run repeats exactly."""

    def __init__(self, p=0.5, seed=None):
        self.p = probability(p, "p")
        self.training = True
        self._rng = np.random.default_rng(seed)
        self._mask = None

    def get_config(self):
        return dict(p=self.p)

    def seed_streams(self, rng):
        self._rng = rng

    def train(self, mode=True):
        self._mask = None
        return super().train(mode)

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must hold floats, got dtype {x.dtype}")
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = 1.0 - self.p
        self._mask = (self._rng.random(x.shape) < keep).astype(x.dtype) / x.dtype.type(keep)
        return x * self._mask

    def backward(self, dy):
        dy = np.asarray(dy)
        if self._mask is None:
            return dy
        if dy.shape != self._mask.shape:
            raise ValueError(f"dy must have shape {self._mask.shape} (the forward output's), "
                             f"got {shape_str(dy)}")
        return dy * self._mask

    def __repr__(self):
        return f"Dropout(p={self.p})"


class LastStep(Layer):
    """Each sequence's output at its last valid step: (B, T, F) + lengths -> (B, F).

    For sequence classification after an LSTM. With ``reverse_features`` = r > 0 (an
    LSTM that is bidirectional, r = its state size), the last r features, those of the
    reverse direction, are taken at step 0 instead, where that direction ends: the
    result is then the final layer's h_n of both directions, as PyTorch users take it.
    ``Sequential`` sets r from the LSTM before it when left as None.
    """

    def __init__(self, reverse_features=None):
        if reverse_features is not None:
            reverse_features = _positive_int(reverse_features, "reverse_features", minimum=0)
        self.reverse_features = reverse_features
        self.training = True
        self._saved = None

    def get_config(self):
        return dict(reverse_features=self.reverse_features)

    def connect(self, spec):
        if spec is not None and not spec.per_step:
            raise ValueError("LastStep needs a sequence (B, T, F), but the layer before "
                             "gives one vector per sequence")
        if self.reverse_features is None:       # where the reverse direction ends: step 0
            self.reverse_features = 0 if spec is None else spec.reverse
        return Features(None if spec is None else spec.size, 0, False)

    def forward_batch(self, x, lengths=None, state=None):
        return self.forward(x, lengths), None

    def step(self, x_t, state=None):
        return x_t                              # a stream's current step is its last

    def forward(self, x, lengths=None):
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"LastStep needs x of shape (B, T, F), got {shape_str(x)}")
        B, T, Fe = x.shape
        lengths = F._lengths(lengths, T, B)
        r = self.reverse_features or 0
        if r > Fe:
            raise ValueError(f"reverse_features ({r}) is more than the features of x {shape_str(x)}")
        rows = np.arange(B)
        y = x[rows, lengths - 1]                       # a copy (fancy indexing)
        if r:
            y[:, Fe - r:] = x[:, 0, Fe - r:]
        self._saved = (x.shape, x.dtype, lengths)
        return y

    def backward(self, dy):
        if self._saved is None:
            raise RuntimeError("LastStep.backward() needs a forward() first")
        (B, T, Fe), dtype, lengths = self._saved
        dy = np.asarray(dy, dtype=dtype)
        if dy.shape != (B, Fe):
            raise ValueError(f"dy must have shape ({B}, {Fe}), got {shape_str(dy)}")
        r = self.reverse_features or 0
        dx = np.zeros((B, T, Fe), dtype)
        rows = np.arange(B)
        dx[rows, lengths - 1, :Fe - r] = dy[:, :Fe - r]
        if r:
            dx[:, 0, Fe - r:] += dy[:, Fe - r:]
        return dx

    def __repr__(self):
        r = "" if self.reverse_features is None else f"reverse_features={self.reverse_features}"
        return f"LastStep({r})"
