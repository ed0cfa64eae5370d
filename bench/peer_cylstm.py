"""cylstm itself, and cylstm at full length on a variable-length case's data."""

from impl import Impl
from problem import as_outputs


class Cylstm(Impl):
    name, label = "cylstm", "cylstm"

    def call(self, task, n, data):
        lstm = self.prob.lstm
        if task == "training":
            lstm.train()
            lstm.zero_grad()

            def step():
                y, st = lstm(data.x, data.state, data.lengths)
                return y, st, lstm.backward(data.dy)
            return step
        lstm.eval()
        if self.case.cfg.state:                       # streaming: the step API
            state = lstm.initial_state(data.x.shape[1], data.state)
            x_t = data.x[0]
            return lambda: (lstm.step(x_t, state)[None], (state.h, state.c))
        return lambda: lstm(data.x, data.state, data.lengths)

    def outputs(self, task, res):
        if task == "inference":
            return as_outputs(res[0], *res[1])
        y, (h, c), (dx, (dh0, dc0)) = res
        return as_outputs(y, h, c, dx, dh0, dc0, self.prob.lstm.grads)


class CylstmFull(Cylstm):
    """cylstm on a varlen case's data at full length (lengths=None), timed in the same
    cell as cylstm, interleaved, for the "variable lengths cost" target. It runs the code
    the base case verifies; it is not a column of the report."""
    name, label = "cylstm-full", "cylstm, full length"
    verified_by = "cylstm"

    def call(self, task, n, data):
        return super().call(task, n, data._replace(lengths=None))
