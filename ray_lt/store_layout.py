"""The names that fix the artifact store's layout on disk, in one dependency-free module.

The stage-key hash (``ray_lt.spec``) and the store (``ray_lt.artifacts`` and its helpers) both
need them; keeping them here lets the spec module compute keys without importing pyarrow, and the
store modules without importing torch.
"""

from __future__ import annotations

import re

#: Hashed into every stage key and written into every manifest: bump it when the layout changes.
STORE_LAYOUT_VERSION = "1"
#: The file listing an artifact's files with their sizes and sha256; written last, so a folder
#: without it is incomplete.
MANIFEST = "manifest.json"
#: A name that is safe as one path component under the store root: no slash, no leading dot
#: (which would hide it or climb out of the root).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The store's own folders beside ``<root>/<key>/`` (names starting with ``_`` are never keys).
TMP_DIR = "_tmp"  # staging folders of uploads in progress
QUARANTINE_DIR = "_quarantine"  # corrupt or incomplete artifacts, kept for inspection
LOCKS_DIR = "_locks"  # one lease lock file per key being trained
RECORDS_DIR = "_records"  # small JSON records of the harness itself (e.g. the MLflow outbox)
TRAIN_DIR = "_train"  # Ray Train's storage_path
