"""Move a trained torch.nn.LSTM into cylstm and check that both compute the same thing.

    pip install torch        # only this example needs it; cylstm itself never imports torch
    python examples/from_pytorch.py

The weights travel as a state dict: straight from the module (tensors are accepted), or
through a NumPy .npz file, so the machine that runs cylstm needs no torch at all.
"""
import os
import tempfile

import numpy as np
import torch

import cylstm

torch.manual_seed(0)
T, B, I, H, P = 20, 4, 8, 32, 16
torch_lstm = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P,
                           batch_first=True).eval()

# 1. On the machine with torch: save the weights as plain arrays.
path = os.path.join(tempfile.mkdtemp(), "lstm_weights.npz")
np.savez(path, **{k: v.detach().numpy() for k, v in torch_lstm.state_dict().items()})

# 2. On the machine without torch: build the same architecture and load the arrays.
lstm = cylstm.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, batch_first=True)
with np.load(path, allow_pickle=False) as weights:
    lstm.load_state_dict(dict(weights))
lstm.eval()

# Same inputs, including sequences of different lengths (PyTorch's packed semantics).
x = np.random.default_rng(0).standard_normal((B, T, I)).astype(np.float32)
lengths = np.array([20, 13, 7, 1])
y, (h_n, c_n) = lstm(x, lengths=lengths)

with torch.no_grad():
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x), torch.from_numpy(lengths), batch_first=True, enforce_sorted=False)
    y_t, (h_t, c_t) = torch_lstm(packed)
    y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(y_t, batch_first=True, total_length=T)

for name, a, b in (("y", y, y_t), ("h_n", h_n, h_t), ("c_n", c_n, c_t)):
    err = np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()
    print(f"{name:4} shape {a.shape}  max relative difference to torch {err:.1e}")
    assert err < 1e-5, name

# Loading straight from the module works too (tensors are read through .numpy()).
lstm.load_state_dict(torch_lstm.state_dict())
print("same outputs after loading the tensors directly:",
      np.array_equal(lstm(x, lengths=lengths)[0], y))
