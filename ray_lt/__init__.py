"""ray-lt: a Ray harness that runs, sweeps and tabulates long-tailed classification methods.

The package is layered one way, each layer importing only those below it: ``metrics`` and
``data`` at the bottom, then ``models``, ``engine``, ``stages``, ``artifacts``, ``pipeline``, and
the two CLIs ``sweep`` and ``report`` on top. Nothing here imports Ray or MLflow at package
import time.
"""

__version__ = "0.1.0"
