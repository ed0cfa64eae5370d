"""torch.nn.LSTM as a peer: its default path (oneDNN for float32 on x86) and its native
path (oneDNN disabled), nn.LSTMCell for a streaming step; and the check of which path
torch's default really took."""

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np

from impl import Impl
from problem import as_outputs


class OneDnnOff:
    """torch's native path: oneDNN disabled around a call. Through the flag's C setter,
    which costs well under a microsecond, where torch.backends.mkldnn.flags() also resets
    TF32 settings and warns."""

    def __init__(self, torch):
        self._c = torch._C

    def __enter__(self):
        self._was = self._c._get_mkldnn_enabled()
        self._c._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        self._c._set_mkldnn_enabled(self._was)


class Torch(Impl):
    """torch.nn.LSTM (packed when lengths are given), or nn.LSTMCell for a streaming step.
    Inference under inference_mode; a training step is forward, backward of sum(y*dy)
    with x.requires_grad (cylstm computes dx too), gradients accumulated, no optimiser."""
    name, label = "torch", "torch"
    needs = "torch"
    native = False

    def __init__(self, case, prob):
        super().__init__(case, prob)
        import torch

        # torch says so once per process; the profiler check records the path anyway
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        self.torch = torch
        cfg = case.cfg
        dt = torch.float64 if case.dtype == np.float64 else torch.float32
        sd = {k: torch.from_numpy(v.copy()) for k, v in prob.params.items()}
        if cfg.state:
            self.model = torch.nn.LSTMCell(cfg.I, cfg.H, dtype=dt)
            sd = {k[:-3]: v for k, v in sd.items()}          # weight_ih_l0 -> weight_ih
        else:
            self.model = torch.nn.LSTM(cfg.I, cfg.H, num_layers=cfg.L, dtype=dt,
                                       bidirectional=case.D == 2, proj_size=case.P)
        self.model.load_state_dict(sd)
        self.path = OneDnnOff(torch) if self.native else contextlib.nullcontext()
        self.uses_onednn = {}          # task -> bool, from the profiler (verification)

    def _forward(self, x, state, lengths):
        if lengths is None:
            return self.model(x, state)
        pack = self.torch.nn.utils.rnn
        y, st = self.model(pack.pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        return pack.pad_packed_sequence(y, total_length=x.shape[0])[0], st

    def call(self, task, n, data):
        torch, path = self.torch, self.path
        x = torch.from_numpy(data.x)
        lengths = None if data.lengths is None else torch.from_numpy(data.lengths)
        if task == "training":
            x = x.clone().requires_grad_(True)
            dy = torch.from_numpy(data.dy)
            self.model.zero_grad()

            def step():
                x.grad = None
                with path:
                    y, st = self._forward(x, None, lengths)
                    (y * dy).sum().backward()
                return y, st, x
            return step
        if self.case.cfg.state:                       # LSTMCell: (B, I), (h, c) (B, H)
            box = [tuple(torch.from_numpy(s[0].copy()) for s in data.state)]
            x_t = x[0]

            def cell():
                with torch.inference_mode():
                    box[0] = h, c = self.model(x_t, box[0])
                return h[None], (h[None], c[None])
            return cell

        def infer():
            with torch.inference_mode(), path:
                return self._forward(x, None, lengths)
        return infer

    def outputs(self, task, res):
        np_ = lambda t: t.detach().numpy()          # noqa: E731
        y, (h, c) = res[0], res[1]
        if task == "inference":
            return as_outputs(np_(y), np_(h), np_(c))
        grads = {k: np_(p.grad) for k, p in self.model.named_parameters()}
        return as_outputs(np_(y), np_(h), np_(c), dx=np_(res[2].grad), grads=grads)


class TorchNative(Torch):
    name, label = "torch-native", "torch native"
    native = True

    @classmethod
    def unsupported(cls, case):
        if case.cfg.state:
            return "nn.LSTMCell has one path (no oneDNN), timed as torch"
        return super().unsupported(case)


@contextlib.contextmanager
def quiet_fds():
    """Send what native code writes to file descriptors 1 and 2 to a temporary file for
    the duration: torch's profiler prints lines such as 'USDT: ... profiler_start' from
    C++ straight to the descriptors, where redirecting sys.stdout cannot reach. What was
    written is shown on stderr if the body raises, so a failure keeps its message."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        failed = True
        try:
            for fd in (1, 2):
                os.dup2(tmp.fileno(), fd)
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            if failed:
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace"))


def profile_onednn(torch, fn):
    """Run fn once under torch's profiler: did a oneDNN RNN kernel run?"""
    from torch.profiler import ProfilerActivity, profile

    with quiet_fds():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return any("mkldnn_rnn" in e.key for e in prof.key_averages())
