"""Typed config: YAML loading, dotted overrides, type and value checks, dict round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
    parse_override,
    validate,
)

TRIALS = Path(__file__).resolve().parents[1] / "trials"
PRESETS = sorted(p for p in TRIALS.glob("*.yaml") if not p.name.startswith("space_"))


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults, presets


def test_defaults_load_and_validate() -> None:
    cfg = Config()
    validate(cfg)
    assert cfg.optim.lr == 0.005 and cfg.optim.name == "sgd"
    assert cfg.model.backbone == "resnet50"
    assert config_from_dict({}) == cfg
    assert config_from_dict(None) == cfg


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "")) == Config()


def test_presets_found() -> None:
    names = {p.name for p in PRESETS}
    assert {"base.yaml", "demo.yaml", "report_a.yaml", "report_b.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    validate(cfg)
    assert cfg != Config()  # a preset changes something


def test_demo_preset_is_cpu_sized() -> None:
    cfg = load_config(TRIALS / "demo.yaml")
    assert cfg.train.device == "cpu" and cfg.model.weights == "none"
    assert cfg.model.backbone == "resnet18"
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = write_yaml(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert str(bad) in str(info.value)


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_section_in_file_names_section_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "modle:\n  backbone: resnet18\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "modle" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "optim:\n  lr: 0.01\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "optim.learning_rate" in message
    assert str(path) in message
    assert "lr" in message  # the valid keys are listed


def test_unknown_override_key_and_section() -> None:
    with pytest.raises(ConfigError, match=r"optim\.nope"):
        apply_overrides(Config(), ["optim.nope=1"])
    with pytest.raises(ConfigError, match="optimizer.lr"):
        apply_overrides(Config(), {"optimizer.lr": 0.1})
    with pytest.raises(ConfigError, match="lr"):
        apply_overrides(Config(), {"lr": 0.1})  # no section


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim"):
        load_config(write_yaml(tmp_path, "optim: 3\n"))


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.mask_head_norm", 1),  # int for bool
        ("train.amp", "yes"),  # string for bool
        ("optim.lr", "fast"),  # string for float
        ("optim.lr", True),  # bool for float
        ("train.epochs", 1.5),  # float for int
        ("train.epochs", True),  # bool for int
        ("train.device", 3),  # int for str
        ("model.anchor_sizes", 16),  # scalar for list
        ("model.aspect_ratios", ["wide"]),  # bad list item
    ],
)
def test_wrong_types_fail_naming_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), {key: value})
    assert key in str(info.value)


def test_wrong_type_in_file_names_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "train:\n  epochs: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.epochs" in str(info.value) and str(path) in str(info.value)


def test_int_for_float_is_accepted_as_float() -> None:
    cfg = apply_overrides(Config(), {"optim.lr": 1})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_exponent_without_dot_is_a_float_in_yaml(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; the config must still take it as a number.
    cfg = load_config(write_yaml(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 5e-5\n"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optim.weight_decay, float) and cfg.optim.weight_decay == pytest.approx(5e-5)


def test_exponent_without_dot_is_a_float_in_overrides(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, ""), ["optim.lr=1e-3", "augment.noise_std=2E-2"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.augment.noise_std == pytest.approx(0.02)


def test_override_values_are_read_as_yaml() -> None:
    cfg = apply_overrides(Config(), ["train.amp=false", "train.epochs=3", "train.device=cpu", "data.root="])
    assert cfg.train.amp is False and cfg.train.epochs == 3 and cfg.train.device == "cpu"
    assert cfg.data.root == ""


def test_list_overrides_become_tuples() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "model.anchors=custom",
            "model.anchor_sizes=[8, 16, 32, 64, 128]",
            "model.aspect_ratios=[0.5, 1, 2]",
        ],
    )
    assert cfg.model.anchor_sizes == (8, 16, 32, 64, 128)
    assert isinstance(cfg.model.anchor_sizes, tuple)
    assert cfg.model.aspect_ratios == (0.5, 1.0, 2.0)
    assert all(isinstance(r, float) for r in cfg.model.aspect_ratios)
    hash(cfg)  # frozen and hashable: no lists left inside


def test_overrides_leave_the_original_untouched() -> None:
    cfg = Config()
    new = apply_overrides(cfg, {"optim.lr": 0.1})
    assert cfg.optim.lr == 0.005 and new.optim.lr == 0.1
    assert new.model == cfg.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.optim.lr = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("model.backbone", "resnet152", ["resnet18", "resnet34", "resnet50", "resnet101"]),
        ("optim.name", "rmsprop", ["sgd", "adam", "adamw"]),
        ("optim.scheduler", "linear", ["cosine", "plateau", "step", "none"]),
        ("model.norm", "ln", ["frozen_bn", "bn", "gn"]),
    ],
)
def test_literal_fields_reject_and_list_allowed(key: str, value: str, allowed: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), {key: value})
    message = str(info.value)
    assert key in message and value in message
    for option in allowed:
        assert option in message


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"data.val_fraction": -0.1}, "data.val_fraction"),
        ({"data.val_fraction": 1.0}, "data.val_fraction"),
        ({"data.max_pixels": 0}, "data.max_pixels"),
        ({"data.max_instances": -1}, "data.max_instances"),
        ({"model.anchors": "custom"}, "model.anchor_sizes"),  # custom without sizes
        ({"model.anchor_sizes": [8, 16, 32, 64, 128]}, "model.anchor_sizes"),  # sizes not custom
        ({"model.anchors": "custom", "model.anchor_sizes": [8, -16]}, "model.anchor_sizes"),
        ({"augment.blur_p": 1.5}, "augment.blur_p"),
        ({"augment.hflip_p": -0.1}, "augment.hflip_p"),
        ({"model.min_size": 900, "model.max_size": 800}, "model.min_size"),
        ({"model.box_nms_thresh": 2.0}, "model.box_nms_thresh"),
        ({"model.trainable_layers": 6}, "model.trainable_layers"),
        ({"model.aspect_ratios": []}, "model.aspect_ratios"),
        ({"optim.lr": 0.0}, "optim.lr"),
        ({"optim.plateau_factor": 1.0}, "optim.plateau_factor"),
        ({"train.epochs": 0}, "train.epochs"),
        ({"augment.crop_size": 16}, "augment.crop_size"),
    ],
)
def test_validate_rejects_impossible_values(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), overrides)


def test_validate_called_directly_on_replaced_config() -> None:
    cfg = Config()
    bad = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, noise_p=1.5))
    with pytest.raises(ConfigError, match="augment.noise_p"):
        validate(bad)


def test_impossible_value_in_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(write_yaml(tmp_path, "data:\n  val_fraction: 1\n"))


def test_val_fraction_zero_is_a_run_without_validation(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "data:\n  val_fraction: 0\n")).data.val_fraction == 0.0


def test_custom_anchors_with_sizes_are_valid() -> None:
    cfg = apply_overrides(Config(), {"model.anchors": "custom", "model.anchor_sizes": [4, 8, 16, 32, 64]})
    assert cfg.model.anchors == "custom"


# ----------------------------------------------------------------------------- round trips


def test_flatten_keys_and_values() -> None:
    cfg = load_config(TRIALS / "demo.yaml")
    flat = flatten(cfg)
    assert flat["optim.lr"] == pytest.approx(1e-3)
    assert flat["model.backbone"] == "resnet18"
    assert flat["model.aspect_ratios"] == [0.5, 1.0, 2.0]
    n_fields = sum(
        len(dataclasses.fields(getattr(cfg, s))) for s in ("data", "model", "augment", "optim", "train")
    )
    assert len(flat) == n_fields
    assert all(k.count(".") == 1 for k in flat)
    # flatten is a valid override mapping: applying it to defaults gives the config back
    assert apply_overrides(Config(), flat) == cfg


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_dict_round_trip_of_presets(path: Path) -> None:
    cfg = load_config(path)
    plain = config_to_dict(cfg)
    assert set(plain) == {"data", "model", "augment", "optim", "train"}
    assert not any(isinstance(v, tuple) for sub in plain.values() for v in sub.values())
    assert config_from_dict(plain) == cfg


def test_dict_round_trip_through_yaml(tmp_path: Path) -> None:
    import yaml

    cfg = apply_overrides(
        load_config(TRIALS / "report_b.yaml"),
        {"model.anchors": "custom", "model.anchor_sizes": [8, 16, 32, 64, 128]},
    )
    path = write_yaml(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


# Hypothesis: random valid values of a few numeric and boolean keys survive the round trip.
OVERRIDE_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "optim.lr": st.floats(min_value=1e-8, max_value=10.0, allow_nan=False),
        "optim.weight_decay": st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        "optim.momentum": st.floats(min_value=0.0, max_value=0.999),
        "augment.blur_p": st.floats(min_value=0.0, max_value=1.0),
        "augment.noise_p": st.sampled_from([0, 1]) | st.floats(min_value=0.0, max_value=1.0),
        "data.val_fraction": st.floats(min_value=0.01, max_value=0.99),
        "train.epochs": st.integers(min_value=1, max_value=500),
        "train.batch_size": st.integers(min_value=1, max_value=64),
        "model.mask_head_channels": st.integers(min_value=1, max_value=1024),
        "model.mask_head_norm": st.booleans(),
        "train.amp": st.booleans(),
        "data.cache_decoded": st.booleans(),
        "model.aspect_ratios": st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=1, max_size=5),
    },
)


@settings(max_examples=60, deadline=None)
@given(values=OVERRIDE_VALUES)
def test_property_overrides_round_trip(values: dict) -> None:
    cfg = apply_overrides(Config(), values)
    for key, value in values.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        if isinstance(value, list):
            assert got == tuple(value)
        else:
            assert got == value
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg
    assert flatten(back) == flatten(cfg)
    # the same values given as --set strings give the same config
    as_text = [f"{k}={_yaml_text(v)}" for k, v in values.items()]
    assert apply_overrides(Config(), as_text) == cfg


def _yaml_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def test_section_types() -> None:
    assert isinstance(Config().optim, OptimConfig)
    assert isinstance(Config().model, ModelConfig)


def test_metric_must_be_one_evaluation_reports(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  metric: segm_ap50\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*train\.metric.*'segm_ap50'.*segm_AP50"):
        load_config(path)
    assert apply_overrides(Config(), {"train.metric": "bbox_AP75"}).train.metric == "bbox_AP75"
    with pytest.raises(ConfigError, match="train.metric"):
        apply_overrides(Config(), {"train.metric": "val_loss"})  # lower is better: not a target
