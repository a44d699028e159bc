"""A dataset's fingerprint: which data a run trained on, cheap enough for every run.

It hashes the training files' names and sizes (relative to ``train/``, so a moved copy keeps its
fingerprint), the test mapping's bytes and the split settings; nothing is decoded. Two datasets
with the same fingerprint give the same training split and the same test images to predict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cellseg.config import DataConfig
from cellseg.data.layout import MAPPING_FILE
from cellseg.errors import DataError

DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest


@dataclass(frozen=True)
class DataFingerprint:
    """A dataset folder, its digest and the figures the digest covers."""

    name: str  # the folder's name, shown in MLflow's Dataset column
    root: str  # the absolute folder
    digest: str  # DIGEST_CHARS hex characters of a SHA-256
    train_images: int
    train_files: int
    train_bytes: int
    mapping_sha256: str  # "absent" when the folder has no test mapping
    val_fraction: float
    split_seed: int

    def profile(self) -> dict[str, object]:
        """What the digest covers, for MLflow's dataset profile and error messages."""
        return {
            "train_images": self.train_images,
            "train_files": self.train_files,
            "train_bytes": self.train_bytes,
            "mapping_sha256": self.mapping_sha256,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
        }


def dataset_fingerprint(data_cfg: DataConfig) -> DataFingerprint:
    """The fingerprint of ``data_cfg.root`` split by ``data_cfg``'s split settings."""
    root = Path(data_cfg.root).resolve()
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train}: no train/ folder; the root must hold train/<id>/image.tif")
    sha = hashlib.sha256()
    images = files = size = 0
    for folder in sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images += 1
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            length = path.stat().st_size
            files, size = files + 1, size + length
            sha.update(f"{folder.name}/{path.name}\t{length}\n".encode())
    mapping = root / MAPPING_FILE
    mapping_sha = hashlib.sha256(mapping.read_bytes()).hexdigest() if mapping.is_file() else "absent"
    sha.update(f"{MAPPING_FILE}\t{mapping_sha}\n".encode())
    sha.update(f"split\t{data_cfg.val_fraction!r}\t{data_cfg.split_seed}\n".encode())
    return DataFingerprint(
        name=root.name,
        root=str(root),
        digest=sha.hexdigest()[:DIGEST_CHARS],
        train_images=images,
        train_files=files,
        train_bytes=size,
        mapping_sha256=mapping_sha,
        val_fraction=data_cfg.val_fraction,
        split_seed=data_cfg.split_seed,
    )
