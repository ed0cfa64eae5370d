"""Run the cylstm benchmark from a checkout: ``python bench/run.py [--quick] [options]``.

The same benchmark as ``python -m cylstm bench`` (cylstm/_bench.py; see bench/README.md),
run on the installed cylstm (``pip install .`` first), writing latest.md, latest.jsonl and latest.png to bench/results/ (git-ignored) unless
``--out`` says otherwise.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")

if __name__ == "__main__":
    from cylstm import _bench

    sys.exit(_bench.main(default_json="", default_out=DEFAULT_OUT, prog="python bench/run.py"))
