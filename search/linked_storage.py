"""Tune storage on this machine's disks, where a reported checkpoint is hard-linked, not copied.

Tune copies every checkpoint a trial reports, from the trial's scratch folder into the search's
storage: each epoch ``last.pt`` with the optimizer state and ``best.pt``, hundreds of megabytes.
When the storage is a local path, Tune and the trials use :func:`linking_filesystem`, whose file
copy is a hard link when source and destination lie on one file system (else a copy, as before).
That is safe because nothing writes into a checkpoint file after it was reported: the trainable
writes every file anew (``save_checkpoint`` renames a new file into place), so the storage keeps
the reported version, and removing the scratch folder leaves the storage's links intact.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pyarrow.fs

TYPE_NAME = "cellseg-linking-local"


class LinkingLocalFileSystem(pyarrow.fs.FileSystemHandler):
    """pyarrow's local file system, with ``copy_file`` as a hard link where the disk allows one."""

    def __init__(self) -> None:
        self._local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:  # pyarrow copies with copy_file only between equals
        return isinstance(other, LinkingLocalFileSystem)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(TYPE_NAME)

    def __reduce__(self) -> tuple[Any, ...]:  # sent to trial workers with their checkpoints
        return (LinkingLocalFileSystem, ())

    def get_type_name(self) -> str:
        return TYPE_NAME

    def copy_file(self, src: str, dest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)  # replaced, never written through: it may be a link of another file
        try:
            os.link(src, dest)
        except OSError:  # another file system, or one without hard links
            self._local.copy_file(src, dest)

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the file system's root")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pyarrow.NativeFile:
        return self._local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pyarrow.NativeFile:
        return self._local.open_append_stream(path, metadata=metadata)


def linking_filesystem() -> pyarrow.fs.FileSystem:
    """A local file system whose copies between its own paths are hard links where possible."""
    return pyarrow.fs.PyFileSystem(LinkingLocalFileSystem())


def links_checkpoints(storage_path: str) -> bool:
    """Whether checkpoints reported into ``storage_path`` are linked: a local path, not a URI."""
    return "://" not in storage_path


def storage_filesystem(storage_path: str) -> pyarrow.fs.FileSystem | None:
    """Tune's storage file system for ``storage_path``: the linking one for a local path, None
    (Tune resolves the URI itself) for ``s3://`` and other URIs."""
    return linking_filesystem() if links_checkpoints(storage_path) else None


def is_local(filesystem: pyarrow.fs.FileSystem) -> bool:
    """Whether ``filesystem``'s paths are paths of this machine (pyarrow's or the linking one)."""
    return filesystem.type_name in ("local", f"py::{TYPE_NAME}")
