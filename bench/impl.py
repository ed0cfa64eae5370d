"""The interface every implementation in the benchmark follows.

Each is built once per case and gives, per task and thread count, a zero-argument
callable that makes one call (carrying the streaming state); the same callable's result
turns into the dict verification compares (`outputs`), so what is timed is what is
verified.
"""

import importlib.util


class Impl:
    name = label = ""
    needs = None              # module that must be installed
    training = True           # can it run a training step?
    verified_by = None        # another implementation whose verification covers this one

    def __init__(self, case, prob):
        self.case, self.prob = case, prob

    @classmethod
    def unsupported(cls, case):
        """Why this implementation cannot run `case`, or None."""
        if cls.needs and importlib.util.find_spec(cls.needs) is None:
            return f"{cls.needs} is not installed"
        return None

    def call(self, task, n, data):
        raise NotImplementedError

    def outputs(self, task, result):
        raise NotImplementedError
