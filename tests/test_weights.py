"""cellseg.weights: ImageNet files downloaded through torch.hub from a locally served mirror,
clear errors without a network, and the one weights_only reader."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

from cellseg.weights import (
    MIRROR_ENV,
    TIMEOUT_ENV,
    WeightsError,
    fetch,
    imagenet_file,
    imagenet_url,
    load_weights_only,
    read_state_dict,
    resolve_weights,
)
from searchutil import free_port

R18_NAME = "resnet18-f37072fd.pth"  # torchvision's file name: the SHA-256 prefix is in it


class Mirror:
    """A loopback HTTP server of one folder that records the paths it was asked for."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                mirror.requests.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_port}/models"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Mirror, Path]]:
    """A mirror serving ``<tmp>/www/models/`` and that folder."""
    folder = tmp_path / "www" / "models"
    folder.mkdir(parents=True)
    mirror = Mirror(tmp_path / "www")
    yield mirror, folder
    mirror.server.shutdown()
    mirror.server.server_close()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME; returns its checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_fetch_downloads_a_served_file_once_and_checks_its_hash(served, tmp_path: Path) -> None:
    mirror, folder = served
    resnet = torchvision.models.resnet18()
    raw = tmp_path / "raw.pth"
    torch.save(resnet.state_dict(), raw)
    name = f"r18-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    (folder / name).write_bytes(raw.read_bytes())
    target = tmp_path / "cache" / name
    assert fetch(f"{mirror.url}/{name}", target) == target
    assert target.read_bytes() == raw.read_bytes()
    assert fetch(f"{mirror.url}/{name}", target) == target
    assert [r for r in mirror.requests if r.endswith(name)] == [f"/models/{name}"]  # once
    state = read_state_dict(target)
    assert torch.equal(state["layer2.0.conv1.weight"], resnet.layer2[0].conv1.weight)
    assert list(target.parent.iterdir()) == [target]  # no partial files left


def test_imagenet_downloads_through_the_mirror_and_refuses_a_wrong_file(
    served, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror, folder = served
    monkeypatch.setenv(MIRROR_ENV, mirror.url + "/")
    assert imagenet_url("resnet18") == f"{mirror.url}/{R18_NAME}"
    (folder / R18_NAME).write_bytes(b"not torchvision's resnet18")
    with pytest.raises(WeightsError, match="invalid hash") as info:
        imagenet_file("resnet18")
    assert f"{mirror.url}/{R18_NAME}" in str(info.value)
    assert str(torch_home / R18_NAME) in str(info.value)
    assert mirror.requests == [f"/models/{R18_NAME}"]
    assert list(torch_home.iterdir()) == []  # the bad download was not kept


def test_without_network_the_error_names_url_path_and_the_ways_out(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{free_port()}/models")  # nobody listens
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet", "resnet50")
    message = str(info.value)
    for part in (
        imagenet_url("resnet50"),
        str(torch_home / "resnet50-0676ba61.pth"),
        "TORCH_HOME",
        MIRROR_ENV,
        "'none'",
    ):
        assert part in message
    monkeypatch.setenv(MIRROR_ENV, f"file://{torch_home.parent / 'nowhere'}")
    with pytest.raises(WeightsError, match="nowhere/resnet50-0676ba61.pth"):
        imagenet_file("resnet50")


def test_a_stalled_server_fails_the_download_after_the_timeout(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}/models")
        monkeypatch.setenv(TIMEOUT_ENV, "1")
        raised: list[BaseException] = []

        def download() -> None:
            try:
                imagenet_file("resnet18")
            except BaseException as exc:
                raised.append(exc)

        worker = threading.Thread(target=download, daemon=True)  # a regression hangs: fail, not wait
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the download still waits on a silent server after 30 s"
        [error] = raised
        assert isinstance(error, WeightsError) and f"{TIMEOUT_ENV}=1 s" in str(error)
    assert socket.getdefaulttimeout() is None  # the timeout does not outlive the download
    assert not torch_home.exists() or list(torch_home.iterdir()) == []
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(WeightsError, match=f"{TIMEOUT_ENV}='soon'"):
        imagenet_file("resnet18")


def test_a_cached_file_is_used_without_any_download(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{free_port()}/models")  # would fail
    torch_home.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, torch_home / R18_NAME)
    assert resolve_weights("imagenet", "resnet18") == torch_home / R18_NAME
    assert imagenet_url("resnet18").startswith("http://127.0.0.1")


def test_file_url_mirror(tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / R18_NAME).write_bytes(b"x")
    monkeypatch.setenv(MIRROR_ENV, folder.as_uri())
    with pytest.raises(WeightsError, match=f"{folder.as_uri()}/{R18_NAME}.*invalid hash"):
        imagenet_file("resnet18")


def test_names_and_local_files(tmp_path: Path) -> None:
    assert resolve_weights("none", "resnet18") is None
    path = tmp_path / "w.pth"
    with pytest.raises(WeightsError, match=r"w\.pth.*'imagenet', 'none' or a file"):
        resolve_weights(str(path), "resnet18")
    torch.save({"w": torch.ones(1)}, path)
    assert resolve_weights(str(path), "resnet18") == path
    with pytest.raises(WeightsError, match="'resnet18', 'resnet34'"):
        imagenet_url("vgg16")


def test_the_one_reader_refuses_code_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"f": functools.partial(print, "ran")}, path)  # picklable, not weights_only-safe
    with pytest.raises(WeightsError, match="evil.pth: not a readable torch file"):
        load_weights_only(path)
    torch.save([torch.ones(1)], path)
    assert load_weights_only(path)[0].item() == 1.0
    with pytest.raises(WeightsError, match="state_dict of tensors"):
        read_state_dict(path)
    path.write_bytes(b"")

    class Oops(ValueError):
        pass

    with pytest.raises(Oops, match="evil.pth: not parts"):
        load_weights_only(path, error=Oops, what="parts")
