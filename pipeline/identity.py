"""What names a training run or a search: everything that changes its result.

A run name is ``<prefix>-<hash>`` of the resolved params that matter, the bytes of the data it
trains and validates on, the source code that computes it, and the bytes of any file it starts
from (ImageNet weights, an init checkpoint). Re-running the same identity resumes (Ray finds
the run under the same name); a change to any of these, a one-byte edit of ``fssd/`` included,
starts a new run.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RESULT_NEUTRAL_TRAIN_KEYS",
    "code_digest",
    "file_digest",
    "digest",
    "train_settings_identity",
]

_REPO = Path(__file__).resolve().parents[1]

#: ``train.*`` keys that do not change what training computes (where and how it runs, logging,
#: whether the tuned values are applied: those arrive as resolved params anyway).
RESULT_NEUTRAL_TRAIN_KEYS = frozenset({
    "storage_path", "run_name", "max_failures", "use_tuned", "log_every", "loader_workers",
    "keep_checkpoints", "cpus_per_worker",
})

#: The modules of ``pipeline/`` whose code decides what a training run computes (beside all of ``fssd/``).
TRAINING_MODULES = ("pipeline/train.py", "pipeline/job.py", "pipeline/params.py")


def digest(payload: Any, length: int = 10) -> str:
    """A short SHA-256 of ``payload`` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (cached per size and modification time within a process)."""
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def code_digest(extra: Iterable[str] = ()) -> str:
    """A SHA-256 over the source of ``fssd/`` and the training modules (plus ``extra``, paths
    relative to the repository), by relative path and bytes."""
    files = sorted((_REPO / "fssd").rglob("*.py"))
    files += [_REPO / rel for rel in (*TRAINING_MODULES, *extra)]
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.relative_to(_REPO).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_digest(f)))
    return h.hexdigest()


def train_settings_identity(train: dict[str, Any], extra_neutral: Iterable[str] = ()) -> dict[str, Any]:
    """The ``train`` params without the keys that do not change the result."""
    neutral = RESULT_NEUTRAL_TRAIN_KEYS | set(extra_neutral)
    return {k: v for k, v in train.items() if k not in neutral}
