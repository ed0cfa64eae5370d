"""The training step: the gradient norm is computed once per step."""
import numpy as np
import pytest

import cylstm
from cylstm import optim


def _char_model(clip_norm=1.0):
    m = cylstm.text.char_model(11, 8, 16, seed=1)
    m.compile(loss="cross_entropy", optimizer="adam", lr=1e-2, clip_norm=clip_norm)
    return m


def _ids():
    ids = np.random.default_rng(2).integers(0, 11, size=(32, 13))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("clip_norm", [1.0, None])
def test_gradient_norm_computed_once_per_step(monkeypatch, clip_norm):
    calls = []
    real = optim._norm

    def counting(flat):
        calls.append(flat.size)
        return real(flat)

    monkeypatch.setattr(optim, "_norm", counting)
    m = _char_model(clip_norm)
    x, y = _ids()
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert len(calls) == 4                      # 4 batches, one norm each
    calls.clear()
    m.optimizer.step()                          # the public step still clips on its own
    assert len(calls) == (1 if clip_norm else 0)


def test_clipping_with_the_known_norm_is_bitwise_the_same():
    runs = []
    for known in (True, False):
        m = _char_model(1e-3)                   # small: every step clips
        x, y = _ids()
        if not known:
            # the optimiser computes the norm itself, as a user's own loop would
            m.optimizer._step_with_norm = lambda norm, f=m.optimizer._step_with_norm: f(None)
        m.fit(x, y, batch_size=8, epochs=2, verbose=0)
        runs.append(m.flat_params.copy())
    np.testing.assert_array_equal(*runs)
