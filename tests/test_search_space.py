"""Search spaces: loading, validation against the config dataclasses, conditional sampling."""

from pathlib import Path

import optuna
import pytest

from cellseg.config import ConfigError, apply_overrides, load_config
from search.space import load_space

TRIALS = Path(__file__).resolve().parents[1] / "trials"


@pytest.fixture
def demo_base():
    return load_config(TRIALS / "demo.yaml")


def write_space(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("space, base", [("space_demo.yaml", "demo.yaml"), ("space_gpu.yaml", "base.yaml")])
def test_shipped_spaces_load_and_enqueue_both_reports(space, base):
    loaded = load_space(TRIALS / space, load_config(TRIALS / base))
    points = loaded.baseline_points()
    assert len(points) == 2
    report_a, report_b = points
    assert report_a["optim.name"] == "sgd" and report_a["optim.momentum"] == 0.9
    assert report_b["optim.name"] == "adam" and "optim.momentum" not in report_b
    assert report_b["optim.scheduler"] == "plateau" and report_b["optim.plateau_patience"] == 3


@pytest.mark.parametrize(
    "body, message",
    [
        ("params:\n  optim.lrr: {uniform: [0.1, 0.2]}\n", "optim.lrr"),
        ("params:\n  model.backbone: {choice: [resnet50, vgg16]}\n", "vgg16"),
        ("params:\n  optim.lr: {loguniform: [0.1, 0.01]}\n", "impossible range"),
        ("params:\n  optim.lr: {loguniform: [0.0, 0.01]}\n", "low > 0"),
        ("params:\n  augment.blur_p: {uniform: [0.0, 1.5]}\n", "augment.blur_p"),
        ("params:\n  train.epochs: {int: [1.5, 3]}\n", "integer bounds"),
        ("params:\n  optim.lr: {normal: [0, 1]}\n", "exactly one of"),
        (
            "params:\n  optim.momentum: {uniform: [0.8, 0.9], if: {optim.name: sgd}}\n"
            "  optim.name: {choice: [sgd, adam]}\n",
            "listed before",
        ),
        ("params: {}\n", "'params'"),
        ("params:\n  optim.lr: {uniform: [0.1, 0.2]}\nextras: 1\n", "top-level keys"),
        ("params:\n  optim.lr: {uniform: [0.1, 0.2]}\nbaselines: [missing.yaml]\n", "missing.yaml"),
    ],
)
def test_bad_spaces_fail_naming_the_problem(tmp_path, demo_base, body, message):
    path = write_space(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_space(path, demo_base)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_space_file_is_a_clear_error(tmp_path, demo_base):
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "nope.yaml", demo_base)


def test_define_by_run_sampling_is_conditional_and_applies_to_the_config(demo_base):
    space = load_space(TRIALS / "space_demo.yaml", demo_base)
    samples = []

    def objective(trial):
        sampled = space(trial)
        samples.append(sampled)
        apply_overrides(demo_base, sampled)  # every sample is a valid config
        return 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).optimize(objective, n_trials=40)
    names = {s["optim.name"] for s in samples}
    assert names == {"sgd", "adam", "adamw"}
    for s in samples:
        assert ("optim.momentum" in s) == (s["optim.name"] == "sgd")
        assert ("optim.step_size" in s) == (s["optim.scheduler"] == "step")
        assert ("optim.plateau_patience" in s) == (s["optim.scheduler"] == "plateau")
        assert isinstance(s["model.aspect_ratios"], list)
        assert 1e-4 <= s["optim.lr"] <= 2e-2
