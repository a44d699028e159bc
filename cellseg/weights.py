"""Pretrained weights by name, and the one reader of torch files.

``model.weights`` is ``imagenet`` (torchvision's file for the backbone, downloaded once into the
torch hub cache, ``$TORCH_HOME/hub/checkpoints``), ``none``, or a local file. On a cluster without
internet access, set ``CELLSEG_WEIGHTS_MIRROR`` to an internal ``https://``, ``http://`` or
``file://`` folder holding torchvision's files under their own names; the file's SHA-256 is
checked against the prefix in its name either way. A download that receives nothing for
``CELLSEG_WEIGHTS_TIMEOUT`` seconds (default 60) fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor

from cellseg.errors import ConfigError

log = logging.getLogger(__name__)

MIRROR_ENV = "CELLSEG_WEIGHTS_MIRROR"
TIMEOUT_ENV = "CELLSEG_WEIGHTS_TIMEOUT"
IMAGENET: dict[str, torchvision.models.WeightsEnum] = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's naming: name-<sha256 prefix>.ext


class WeightsError(ConfigError):
    """Weights (``model.weights``) that cannot be found, downloaded or read."""


def load_weights_only(
    path: Path, *, error: type[ValueError] = WeightsError, what: str = "a readable torch file"
) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (nothing in the file can run code);
    ``error`` naming the file when it is truncated, foreign or holds code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, foreign or unsafe files
        raise error(f"{path}: not {what} ({exc})") from exc


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A file holding a mapping of names to tensors (a state_dict)."""
    state = load_weights_only(path, what="a readable weights file (model.weights)")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"model.weights: {path} does not hold a state_dict of tensors")
    return dict(state)


def imagenet_url(backbone: str) -> str:
    """Where the ImageNet file of ``backbone`` is downloaded from: torchvision's URL, or the same
    file name under ``$CELLSEG_WEIGHTS_MIRROR`` when that is set."""
    if backbone not in IMAGENET:
        raise WeightsError(
            f"model.backbone: {backbone!r} has no ImageNet weights here; one of "
            f"{', '.join(map(repr, IMAGENET))}"
        )
    url = IMAGENET[backbone].url
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{Path(urlparse(url).path).name}" if mirror else url


def download_timeout() -> float:
    """Seconds a download may wait for the server's next bytes (``$CELLSEG_WEIGHTS_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "60").strip()
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise WeightsError(f"{TIMEOUT_ENV}={raw!r}: give the download timeout as seconds > 0")
    return seconds


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """New sockets time out after ``seconds`` (``torch.hub`` opens its URL without a timeout)."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def fetch(url: str, path: Path) -> Path:
    """Download ``url`` to ``path`` unless it is there, through ``torch.hub``: written to a
    temporary file and renamed when complete (concurrent fetches on one node are safe), its
    SHA-256 checked against the prefix in the file name; a server that stalls for
    ``download_timeout()`` seconds fails the download."""
    if path.is_file():
        return path
    match = HASH_IN_NAME.search(path.name)
    timeout = download_timeout()
    log.info("downloading %s to %s", url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with socket_timeout(timeout):
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=False)
    except (OSError, RuntimeError) as exc:  # URLError, HTTPError, disk errors; a hash mismatch
        raise WeightsError(
            f"model.weights: downloading {url} to {path} failed ({exc}; {TIMEOUT_ENV}="
            f"{timeout:g} s). Without internet "
            f"access, copy that file to {path} (or point TORCH_HOME at a folder holding "
            f"hub/checkpoints/{path.name}), set {MIRROR_ENV} to an internal mirror, or set "
            "model.weights to a local file or 'none'"
        ) from exc
    return path


def imagenet_file(backbone: str) -> Path:
    """The ImageNet file of ``backbone`` in the torch hub cache, downloaded when absent."""
    url = imagenet_url(backbone)
    return fetch(url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name)


def resolve_weights(weights: str, backbone: str) -> Path | None:
    """The file ``model.weights`` names (downloaded if it is ``imagenet``), or None for ``none``."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return imagenet_file(backbone)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights: {str(path)!r} is not 'imagenet', 'none' or a file")
    return path
