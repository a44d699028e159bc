"""Reading, validating and serving the cell dataset, plus synthetic data in the same layout."""

from cellseg.data.augment import build_augment
from cellseg.data.dataset import CellDataset, collate, split_items, split_sizes
from cellseg.data.fingerprint import DataFingerprint, dataset_fingerprint
from cellseg.data.layout import (
    TestImage,
    TrainItem,
    check_test_header,
    check_test_image,
    find_test_folder,
    load_test_images,
    scan_train,
)
from cellseg.data.sample import ground_truth_maps, load_label_maps, load_sample
from cellseg.data.stats import dataset_stats, format_stats
from cellseg.data.synth import PROFILES, make_synthetic_dataset
from cellseg.data.targets import targets_from_label_maps
from cellseg.data.tiff_io import read_image, read_mask, write_image, write_mask
from cellseg.errors import DataError

__all__ = [
    "PROFILES",
    "CellDataset",
    "DataError",
    "DataFingerprint",
    "TestImage",
    "TrainItem",
    "build_augment",
    "check_test_header",
    "check_test_image",
    "collate",
    "dataset_fingerprint",
    "dataset_stats",
    "find_test_folder",
    "format_stats",
    "ground_truth_maps",
    "load_label_maps",
    "load_sample",
    "load_test_images",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "scan_train",
    "split_items",
    "split_sizes",
    "targets_from_label_maps",
    "write_image",
    "write_mask",
]
