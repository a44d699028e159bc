"""Checkpoints: atomic save, weights-only load, clear errors for bad files, run-directory lookup."""

from __future__ import annotations

import math
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    make_state,
    save_checkpoint,
)
from cellseg.config import Config, apply_overrides


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)


class Picklable:
    """Picklable, but not a type weights_only loading allows."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture
def cfg() -> Config:
    return apply_overrides(
        Config(), {"optim.lr": 0.0123, "model.anchors": "custom", "model.anchor_sizes": [8, 16, 32, 64, 128]}
    )


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def full_state(cfg: Config, model: torch.nn.Module, epoch: int = 3) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loss = model.norm(model.conv(torch.randn(2, 3, 8, 8))).square().mean()
    loss.backward()
    optimizer.step()
    return make_state(
        cfg,
        model,
        epoch=epoch,
        metrics={"segm_AP50": 0.5, "val_loss": 1.25},
        optimizer=optimizer.state_dict(),
        schedule={"iteration": 12, "epoch": 3, "factor": 0.5, "best": -math.inf, "bad_epochs": 0},
        scaler=None,
        torch_rng=torch.get_rng_state(),
        history=[{"epoch": 1.0, "segm_AP50": 0.1}, {"epoch": 2.0, "segm_AP50": 0.5}],
        best_metric=0.5,
        best_epoch=2,
    )


def test_round_trip_weights_only(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    state = full_state(cfg, model)
    path = save_checkpoint(tmp_path / "run" / LAST, state)  # creates the parent folder
    assert path == tmp_path / "run" / LAST and path.is_file()
    # the file loads with torch's own weights_only loader, so nothing in it can run code
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw.keys() == state.keys()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["metrics"] == {"segm_AP50": 0.5, "val_loss": 1.25}
    assert loaded["history"] == state["history"] and loaded["best_epoch"] == 2
    assert loaded["schedule"]["best"] == -math.inf
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    fresh = Tiny()
    fresh.load_state_dict(loaded["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == 1
    assert checkpoint_config(loaded) == cfg
    assert checkpoint_config(loaded).model.anchor_sizes == (8, 16, 32, 64, 128)
    assert [p.name for p in path.parent.iterdir()] == [LAST]  # no temp files left


def test_saved_without_record_crcs_and_torchs_setting_restored(
    tmp_path: Path, cfg: Config, model: Tiny
) -> None:
    assert torch.serialization.get_crc32_options()  # torch's default
    path = save_checkpoint(tmp_path / LAST, full_state(cfg, model))
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        assert tensors and all(info.CRC == 0 for info in tensors)
    assert torch.serialization.get_crc32_options()  # other torch.save calls still write them
    assert load_checkpoint(path)["epoch"] == 3


def test_save_replaces_existing(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    path = tmp_path / BEST
    save_checkpoint(path, make_state(cfg, model, epoch=1, metrics={}))
    save_checkpoint(path, make_state(cfg, model, epoch=2, metrics={}))
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [BEST]


def test_interrupted_save_keeps_old_checkpoint_and_no_temp_files(
    tmp_path: Path, cfg: Config, model: Tiny
) -> None:
    path = tmp_path / LAST
    save_checkpoint(path, make_state(cfg, model, epoch=1, metrics={"segm_AP50": 0.25}))
    before = path.read_bytes()
    # big tensors come first, so torch.save has written part of the file when pickling fails
    bad = make_state(cfg, model, epoch=2, metrics={}, big=torch.zeros(1 << 18), lock=threading.Lock())
    with pytest.raises(Exception) as info:
        save_checkpoint(path, bad)
    assert "lock" in str(info.value).lower() or "pickle" in str(info.value).lower()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_interrupted_first_save_leaves_nothing(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    with pytest.raises(Exception, match="(?i)pickle|lambda"):
        save_checkpoint(tmp_path / BEST, make_state(cfg, model, epoch=1, metrics={}, fn=lambda: None))
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_the_file(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    path = save_checkpoint(tmp_path / BEST, full_state(cfg, model))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / BEST
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=BEST):
        load_checkpoint(path)


def test_foreign_tensor_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="not a cellseg checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path: Path, model: Tiny) -> None:
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)  # what torchvision's weights files look like
    with pytest.raises(CheckpointError, match="config/model/epoch"):
        load_checkpoint(path)


def test_unsafe_pickle_is_refused(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    path = tmp_path / BEST
    torch.save(make_state(cfg, model, epoch=1, metrics={}, extra=Picklable()), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_directory_prefers_best_then_last(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    save_checkpoint(tmp_path / LAST, make_state(cfg, model, epoch=5, metrics={"which": 0.0}))
    assert load_checkpoint(tmp_path)["epoch"] == 5  # only last.pt: use it
    save_checkpoint(tmp_path / BEST, make_state(cfg, model, epoch=2, metrics={"which": 1.0}))
    assert load_checkpoint(tmp_path)["epoch"] == 2  # best.pt present: it wins
    assert load_checkpoint(str(tmp_path))["metrics"] == {"which": 1.0}  # str paths work too
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 5  # an explicit file is honoured


def test_bad_config_inside_checkpoint(tmp_path: Path, cfg: Config, model: Tiny) -> None:
    state = make_state(cfg, model, epoch=1, metrics={})
    state["config"]["optim"]["nope"] = 1
    save_checkpoint(tmp_path / BEST, state)
    from cellseg.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint config: .*optim\.nope"):
        checkpoint_config(load_checkpoint(tmp_path / BEST))
