"""The NumPy reference (cylstm.reference, per layer and direction) as a peer."""

from impl import Impl
from problem import Reference, as_outputs


class NumpyRef(Impl):
    name, label = "reference", "NumPy ref"

    def __init__(self, case, prob):
        super().__init__(case, prob)
        self.model = Reference(prob.params, case.cfg.L, case.D, case.dtype)

    def call(self, task, n, data):
        m = self.model
        if task == "training":
            m.zero_grad()

            def step():
                y, st, caches = m.forward(data.x, data.state, data.lengths, training=True)
                return y, st, m.backward(caches, data.dy)
            return step
        box = [data.state]

        def infer():
            y, st, _ = m.forward(data.x, box[0], data.lengths, training=False)
            if self.case.cfg.state:
                box[0] = st
            return y, st
        return infer

    def outputs(self, task, res):
        if task == "inference":
            return as_outputs(res[0], *res[1])
        y, (h, c), (dx, (dh0, dc0)) = res
        return as_outputs(y, h, c, dx, dh0, dc0, self.model.grads)
