"""Stage objectives, one module per method, each registered by explicit name in ``OBJECTIVES``.

``upstream`` is the toolkit they share (rebuilding upstream models, frozen helpers, CE).
"""

from ray_lt.objective import OBJECTIVES
from ray_lt.stages import (
    baseline,  # noqa: F401  (registers ce, crt, lws)
    cbd,  # noqa: F401  (registers cbd_teacher, cbd_student)
    cbe,  # noqa: F401  (registers cbe_expert)
    cbe_calibration,  # noqa: F401  (registers cbe_calibrate)
    cbe_logits,  # noqa: F401  (registers cbe_logits)
    ssd_lt,  # noqa: F401  (registers ssd_feature, ssd_distill)
    tau_norm,  # noqa: F401  (registers tau_norm)
)

__all__ = ["OBJECTIVES"]
