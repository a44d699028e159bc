"""Synthetic datasets in exactly the real layout and file formats, for tests and CPU demos.

Profiles:
- ``"realistic"``: sides from ``min_side`` to ``max_side`` (mostly 96-400 px), 1 to ``max_cells``
  cells with the real class mix (class2 78 %), dense clusters of touching nuclei, non-contiguous
  ids above 255, absent class files, images without cells, pixels in two class files. The test set
  holds a 33x35 image and a wide ``max_side``-wide image when ``n_test >= 2``.
- ``"easy"``: 64-160 px images with 2-12 large, well-separated cells (fewer where they do not
  fit) of strongly coloured, evenly drawn classes, for tests that check a model learns; no empty
  images or shared pixels; ``min_side``, ``max_side`` and ``max_cells`` do not apply.
- ``"medium"``: easy's image sizes (so a model costs the same) with 4-24 cells of closer colours
  and overlapping size ranges on the realistic textured, noisier background, placed at random so
  that they touch and occlude each other, and a touching cluster in one image of five: the demo
  search's data, on which a small model stays clearly below AP50 1.0 and trials differ.

Classes look different: 1 large pale-pink round, 2 small dark-purple nuclei, 3 medium elongated
orange-brown, 4 large brown or blue blobs. Test ground truth goes to
``test_ground_truth/<stem>/classN.tif`` (outside the test folder), read by ``ground_truth_maps``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.data.layout import IMAGE_FILE, MAPPING_FILE, NUM_CLASSES
from cellseg.data.sample import GROUND_TRUTH_FOLDER
from cellseg.data.tiff_io import write_image, write_mask
from cellseg.errors import DataError

PROFILES = ("realistic", "easy", "medium")
CLASS_SHARE = np.array([0.15, 0.78, 0.04, 0.03])  # real instance shares of classes 1-4
CLASS_PRESENCE = np.array([0.3, 0.66, 0.5, 0.33])  # real share of images holding each class
TINY_TEST_SHAPE = (33, 35)  # the smallest real test image


@dataclass(frozen=True)
class _Style:
    colours: tuple[tuple[int, int, int], ...]  # RGB, one drawn per cell
    radius: tuple[float, float]  # semi-major axis range in pixels
    ratio: tuple[float, float]  # minor / major axis range


_STYLES = {
    "realistic": (
        _Style(((236, 170, 196),), (11, 17), (0.8, 1.0)),
        _Style(((92, 48, 130),), (7, 12), (0.7, 1.0)),
        _Style(((196, 118, 56),), (15, 24), (0.35, 0.55)),
        _Style(((128, 78, 44), (70, 96, 170)), (20, 32), (0.7, 1.0)),
    ),
    "easy": (
        _Style(((240, 110, 180),), (11, 14), (0.9, 1.0)),
        _Style(((60, 20, 110),), (7, 9), (0.85, 1.0)),
        _Style(((235, 140, 20),), (15, 18), (0.35, 0.45)),
        _Style(((110, 60, 20),), (17, 21), (0.85, 1.0)),
    ),
    "medium": (
        _Style(((214, 150, 190),), (10, 16), (0.75, 1.0)),
        _Style(((112, 64, 142),), (6, 11), (0.7, 1.0)),
        _Style(((200, 132, 96),), (12, 20), (0.4, 0.65)),
        _Style(((150, 96, 72), (112, 112, 170)), (14, 22), (0.7, 1.0)),
    ),
}


@dataclass(frozen=True)
class _Look:
    """How a profile draws an image besides its cell styles."""

    textured: bool  # the realistic background texture (else a flat light one)
    even_classes: bool  # present classes drawn evenly (else the real class mix)
    apart: bool  # cells kept 4 px apart (else placed at random, touching and occluding)
    noise: float  # pixel noise standard deviation


_LOOKS = {
    "realistic": _Look(textured=True, even_classes=False, apart=False, noise=4.0),
    "easy": _Look(textured=False, even_classes=True, apart=True, noise=2.0),
    "medium": _Look(textured=True, even_classes=True, apart=False, noise=6.0),
}


@dataclass(frozen=True)
class _Plan:
    height: int
    width: int
    n_cells: int
    dense: bool = False
    overlap: bool = False


@dataclass
class _Cell:
    cls: int
    cy: float
    cx: float
    major: float
    minor: float
    angle: float
    colour: np.ndarray


def _realistic_plans(
    rng: np.random.Generator, n: int, test: bool, min_side: int, max_side: int, max_cells: int
) -> list[_Plan]:
    """Per-image sizes and features; the first few images force every quirk to appear."""
    ranges = [(min_side, 63), (64, 95), (96, 400), (max(401, max_side * 4 // 5), max_side)]

    def side(k: int) -> int:
        lo, hi = (int(np.clip(v, min_side, max_side)) for v in ranges[k])
        return int(rng.integers(lo, max(lo, hi) + 1))

    def count(h: int, w: int, dense: bool) -> int:
        cap = max(1, min(max_cells, int((0.55 if dense else 0.35) * h * w / 300)))
        return cap if dense else int(np.clip(round(rng.lognormal(np.log(25), 0.9)), 1, cap))

    plans = []
    for i in range(n):
        k = int(rng.choice(4, p=[0.05, 0.10, 0.75, 0.10]))
        h, w = side(k), side(k)
        dense, overlap, empty = rng.random() < 0.15, rng.random() < 0.1, rng.random() < 0.05
        if test and i == 0:  # the smallest real test image
            (h, w), dense, empty = TINY_TEST_SHAPE, False, False
        elif test and i == 1:  # a wide, crowded strip
            h, w, dense, empty = max(min_side, max_side * 27 // 100), max_side, True, False
        elif not test and i == 0:  # both sides under 64 px
            h, w = side(0), side(0)
        elif not test and i == 1:  # max_side wide and crowded: ids above 255
            h, w, dense, empty = side(3), max_side, True, False
        elif not test and i == 2:
            empty = True
        elif not test and i == 3:
            overlap, empty = True, False
        plans.append(_Plan(h, w, 0 if empty else count(h, w, dense), dense, overlap))
    return plans


def _easy_plans(rng: np.random.Generator, n: int) -> list[_Plan]:
    return [
        _Plan(int(rng.integers(64, 161)), int(rng.integers(64, 161)), int(rng.integers(2, 13)))
        for _ in range(n)
    ]


def _medium_plans(rng: np.random.Generator, n: int) -> list[_Plan]:
    plans = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(64, 161, 2))
        plans.append(_Plan(h, w, int(rng.integers(4, 25)), dense=bool(rng.random() < 0.2)))
    return plans


def _place(rng: np.random.Generator, plan: _Plan, cells: list[_Cell], apart: bool) -> list[_Cell]:
    """Set centres: apart, a touching cluster (dense) or uniform; return those placed."""
    if apart:
        return _place_apart(rng, plan, cells)
    if plan.dense:
        points = _cluster(rng, plan, len(cells))
    else:
        points = rng.uniform((0, 0), (plan.height, plan.width), (len(cells), 2))
    for cell, (cy, cx) in zip(cells, points):
        cell.cy, cell.cx = float(cy), float(cx)
    return cells


def _cluster(rng: np.random.Generator, plan: _Plan, n: int) -> np.ndarray:
    """n jittered points of a 16 px hexagonal grid around a random point: nuclei that touch."""
    step = 16.0
    ys, xs = np.meshgrid(
        np.arange(0, plan.height, step * 0.866), np.arange(0, plan.width, step), indexing="ij"
    )
    xs = xs + (np.arange(ys.shape[0])[:, None] % 2) * step / 2
    grid = np.stack([ys.ravel(), xs.ravel()], 1)
    centre = grid[rng.integers(len(grid))]
    nearest = np.argsort(((grid - centre) ** 2).sum(1), kind="stable")[:n]
    return grid[nearest] + rng.uniform(-2, 2, (len(nearest), 2))


def _place_apart(rng: np.random.Generator, plan: _Plan, cells: list[_Cell]) -> list[_Cell]:
    """Inside the image and 4 px clear of earlier cells; a cell without room is dropped."""
    placed: list[_Cell] = []
    for cell in cells:
        r = cell.major
        for _ in range(50):
            cell.cy, cell.cx = rng.uniform(r, plan.height - r), rng.uniform(r, plan.width - r)
            if all(np.hypot(cell.cy - o.cy, cell.cx - o.cx) > r + o.major + 4 for o in placed):
                placed.append(cell)
                break
    return placed


def _paint(
    image: np.ndarray,
    label_maps: np.ndarray,
    occupied: np.ndarray,
    cell: _Cell,
    index: int,
    claim_occupied: bool = False,
) -> bool:
    """Draw one filled ellipse on its bounding box; False if under half of it is free."""
    h, w = occupied.shape
    r = cell.major + 1
    y0, y1 = max(0, int(cell.cy - r)), min(h, int(np.ceil(cell.cy + r)) + 1)
    x0, x1 = max(0, int(cell.cx - r)), min(w, int(np.ceil(cell.cx + r)) + 1)
    if y0 >= y1 or x0 >= x1:
        return False
    dy, dx = np.ogrid[y0:y1, x0:x1]
    dy, dx = dy - cell.cy, dx - cell.cx
    cos, sin = np.cos(cell.angle), np.sin(cell.angle)
    rho2 = ((dx * cos + dy * sin) / cell.major) ** 2 + ((dy * cos - dx * sin) / cell.minor) ** 2
    inside = rho2 <= 1
    own = label_maps[cell.cls - 1, y0:y1, x0:x1]
    occ = occupied[y0:y1, x0:x1]
    free = inside & (own == 0) & (claim_occupied | ~occ)
    if free.sum() == 0 or free.sum() < 0.5 * inside.sum():
        return False
    own[free] = index
    occ[free] = True
    shade = 0.85 + 0.15 * (1 - rho2[free])  # darker rims
    image[y0:y1, x0:x1][free] = cell.colour * shade[:, None]
    return True


def _random_cell(rng: np.random.Generator, styles: tuple[_Style, ...], cls: int, scale: float = 1.0) -> _Cell:
    style = styles[cls - 1]
    major = rng.uniform(*style.radius) * scale
    colour = np.array(style.colours[rng.integers(len(style.colours))], np.float32)
    colour = np.clip(colour + rng.normal(0, 6, 3), 0, 255)
    return _Cell(
        cls,
        0.0,
        0.0,
        major,
        major * rng.uniform(*style.ratio),
        rng.uniform(0, np.pi),
        colour.astype(np.float32),
    )


def _background(rng: np.random.Generator, h: int, w: int, textured: bool) -> np.ndarray:
    """Light background; a textured one carries a smooth texture of random plane waves."""
    image = np.empty((h, w, 3), np.float32)
    image[:] = (238, 222, 232) if textured else (246, 242, 242)
    if textured:
        texture = np.zeros((h, w), np.float32)
        for _ in range(3):  # sin(a + b) = sin a cos b + cos a sin b: two outer products
            fy, fx = rng.uniform(0.01, 0.08, 2)
            a = (fy * np.arange(h) + rng.uniform(0, 2 * np.pi)).astype(np.float32)[:, None]
            b = (fx * np.arange(w)).astype(np.float32)[None, :]
            texture += np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)
        image += 6 * texture[..., None]
    return image


def _cell_classes(rng: np.random.Generator, plan: _Plan, even: bool) -> np.ndarray:
    """Classes of up to ``plan.n_cells`` cells: the real class mix over the classes present.

    Dense images always hold nuclei (class 2); with ``even`` present classes are drawn evenly.
    """
    present = rng.random(NUM_CLASSES) < (0.6 if even else CLASS_PRESENCE)
    present[1] |= plan.dense or not present.any()
    if even:
        return rng.choice(np.flatnonzero(present) + 1, plan.n_cells)
    counts = rng.multinomial(plan.n_cells, CLASS_SHARE) * present
    if plan.n_cells and not counts.any():
        counts[rng.choice(np.flatnonzero(present))] = 1
    return np.repeat(np.arange(1, NUM_CLASSES + 1), counts)


def _render(rng: np.random.Generator, plan: _Plan, profile: str) -> tuple[np.ndarray, np.ndarray]:
    """One RGBA uint8 image and its int32 (4, H, W) label maps with the file ids."""
    look, styles = _LOOKS[profile], _STYLES[profile]
    image = _background(rng, plan.height, plan.width, look.textured)
    label_maps = np.zeros((NUM_CLASSES, plan.height, plan.width), np.int32)
    occupied = np.zeros((plan.height, plan.width), bool)
    classes = _cell_classes(rng, plan, look.even_classes)
    cells = sorted((_random_cell(rng, styles, int(c)) for c in classes), key=lambda c: -c.major)
    drawn: list[_Cell] = []
    for cell in _place(rng, plan, cells, look.apart):  # large cells first: they fit and keep shape
        if _paint(image, label_maps, occupied, cell, len(drawn) + 1):
            drawn.append(cell)
    if plan.overlap and drawn:
        _add_overlap(rng, image, label_maps, occupied, drawn, styles)
    lut = np.zeros(len(drawn) + 1, np.int32)
    order = sorted(range(len(drawn)), key=lambda k: (drawn[k].cls, k))
    gaps = 1 + (rng.random(len(drawn)) < 0.15) * rng.integers(1, 6, len(drawn))
    lut[np.asarray(order, np.intp) + 1] = np.cumsum(gaps)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * look.noise
    rgb = np.clip(image + noise, 0, 255).round().astype(np.uint8)
    alpha = np.full((plan.height, plan.width, 1), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=2), lut[label_maps]


def _add_overlap(
    rng: np.random.Generator,
    image: np.ndarray,
    label_maps: np.ndarray,
    occupied: np.ndarray,
    drawn: list[_Cell],
    styles: tuple[_Style, ...],
) -> None:
    """Draw a small cell of another class on a drawn cell's rim, labelling shared pixels twice."""
    for _ in range(10):
        host = drawn[rng.integers(len(drawn))]
        other = [c for c in range(1, NUM_CLASSES + 1) if c != host.cls]
        cell = _random_cell(rng, styles, int(rng.choice(other)), scale=0.6)
        phi = rng.uniform(0, 2 * np.pi)
        cell.cy, cell.cx = host.cy + host.minor * np.sin(phi), host.cx + host.minor * np.cos(phi)
        if _paint(image, label_maps, occupied, cell, len(drawn) + 1, claim_occupied=True):
            drawn.append(cell)
            if ((label_maps > 0).sum(0) > 1).any():
                return


def _write_masks(folder: Path, label_maps: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(1, NUM_CLASSES + 1):
        if label_maps[c - 1].any():
            write_mask(folder / f"class{c}.tif", label_maps[c - 1])


def make_synthetic_dataset(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    min_side: int = 48,
    max_side: int = 1600,
    max_cells: int = 300,
    profile: str = "realistic",
) -> Path:
    """Write a synthetic dataset into the empty or new folder ``out_dir`` and return its path.

    The same arguments give byte-identical files (uuids come from the seeded generator).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} unknown; choose one of {', '.join(PROFILES)}")
    if n_train < 0 or n_test < 0 or max_cells < 1 or not 1 <= min_side <= max_side:
        raise ValueError("need n_train, n_test >= 0, max_cells >= 1 and 1 <= min_side <= max_side")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: folder not empty; synthetic data needs a new folder")
    rng = np.random.default_rng(seed)

    def plans(n: int, test: bool) -> list[_Plan]:
        if profile == "easy":
            return _easy_plans(rng, n)
        if profile == "medium":
            return _medium_plans(rng, n)
        return _realistic_plans(rng, n, test, min_side, max_side, max_cells)

    def new_id() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    for plan in plans(n_train, test=False):
        folder = out / "train" / new_id()
        rgba, label_maps = _render(rng, plan, profile)
        _write_masks(folder, label_maps)
        write_image(folder / IMAGE_FILE, rgba)
    (out / "test_release").mkdir(parents=True, exist_ok=True)
    others = rng.choice(np.arange(3, 2 * n_test + 2), max(n_test - 1, 0), replace=False)
    ids = rng.permutation(np.r_[1, others])  # shuffled, starting at 1, 2 never used: gapped
    mapping = []
    for plan, image_id in zip(plans(n_test, test=True), ids):
        name = new_id()
        rgba, label_maps = _render(rng, plan, profile)
        write_image(out / "test_release" / f"{name}.tif", rgba)
        _write_masks(out / GROUND_TRUTH_FOLDER / name, label_maps)
        mapping.append(
            {"file_name": f"{name}.tif", "id": int(image_id), "height": plan.height, "width": plan.width}
        )
    (out / MAPPING_FILE).write_text(json.dumps(mapping, indent=4))
    return out
