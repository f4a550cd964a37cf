"""One exception family for everything a user can get wrong.

Every message is one line that names the cause, the offending value and the fix; the CLIs print
it without a traceback and exit non-zero. ``assert`` stays for internal invariants only.
"""

from __future__ import annotations

# The key of a trial's report when its configuration failed: the sweep prints it, the searcher
# counts the trial as failed, and Tune does not retry it.
ERROR_KEY = "ray_lt_error"


class RayLtError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class UnknownNameError(RayLtError):
    """A registry lookup named something that is not registered."""


class ConfigError(RayLtError):
    """A spec, experiment or search space is malformed or impossible."""


class DataError(RayLtError):
    """A dataset is missing, malformed or inconsistent."""


class ArtifactError(RayLtError):
    """The artifact store cannot be read or written."""


class CorruptArtifactError(ArtifactError):
    """A stored artifact fails its checksum or is incomplete."""


class NonFiniteLossError(RayLtError):
    """Training produced a NaN or infinite loss."""


class ExperimentError(RayLtError):
    """An experiment file cannot be loaded."""
