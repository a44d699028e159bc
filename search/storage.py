"""A check that the search's storage can take checkpoints, before any trial starts."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow.fs

PROBE_BYTES = 1 << 20


class StorageError(RuntimeError):
    """The storage path cannot be written or has too little free space."""


def check_storage(storage: str, min_free_gb: float) -> None:
    """Write and delete a 1 MB probe under ``storage``; for a local path also check free space.

    Raises StorageError naming the path and the fix, instead of letting trials fail (or Tune
    stall) later when their first checkpoint cannot be written.
    """
    probe_name = f".cellseg-probe-{uuid.uuid4().hex}"
    try:
        if "://" in storage:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
            filesystem.create_dir(path, recursive=True)
            with filesystem.open_output_stream(f"{path}/{probe_name}") as out:
                out.write(bytes(PROBE_BYTES))
            filesystem.delete_file(f"{path}/{probe_name}")
            return
        folder = Path(storage)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / probe_name
        try:
            probe.write_bytes(bytes(PROBE_BYTES))
        finally:
            probe.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise StorageError(
            f"storage {storage} is not writable ({exc}); pass --storage with a "
            "folder or s3:// path this machine can write"
        ) from exc
    free_gb = shutil.disk_usage(folder).free / 1e9
    if free_gb < min_free_gb:
        raise StorageError(
            f"storage {storage} has {free_gb:.1f} GB free, below --min-free-gb "
            f"{min_free_gb:g}; free space or pass --storage on a larger disk"
        )
