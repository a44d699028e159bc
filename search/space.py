"""Search spaces from YAML, checked against the config dataclasses, sampled define-by-run.

A space file holds ``params``: dotted config keys, each with one distribution
(``choice: [...]``, ``uniform: [lo, hi]``, ``loguniform: [lo, hi]`` or ``int: [lo, hi]``) and an
optional condition ``if: {earlier.key: value or [values]}``; and ``baselines``: preset files whose
values on the space's dimensions are enqueued as the first trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from cellseg.config import Config, apply_overrides, flatten, load_config
from cellseg.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple  # choices, or (low, high)
    condition: tuple[tuple[str, tuple], ...] = ()

    def active(self, sampled: dict[str, Any]) -> bool:
        """Whether this parameter's condition holds for the values sampled so far."""
        return all(sampled.get(key) in allowed for key, allowed in self.condition)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.values[0] <= value <= self.values[1] and (self.kind != "int" or value == int(value))

    def encode(self, value: Any) -> Any:
        """Optuna's categorical choices must be scalars: lists travel as JSON strings."""
        return json.dumps(value) if isinstance(value, (list, tuple)) else value

    def decode(self, value: Any) -> Any:
        """The config value of an Optuna-encoded choice (``encode``'s inverse)."""
        if self.kind == "choice" and isinstance(value, str) and value.startswith("["):
            return json.loads(value)
        return value

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution ``sample`` draws from."""
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution([self.encode(v) for v in self.values])
        low, high = self.values
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(low), int(high))
        return optuna.distributions.FloatDistribution(low, high, log=self.kind == "loguniform")

    def sample(self, trial: Any) -> Any:
        """Draw this parameter from an Optuna trial (or Ray's capturing stand-in)."""
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.key, [self.encode(v) for v in self.values]))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, low, high, log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    """An ordered list of parameters; calling it on an Optuna trial samples a flat config dict."""

    params: tuple[Param, ...]
    baselines: tuple[str, ...] = ()
    source: str = ""

    def __call__(self, trial: Any) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(sampled):
                sampled[param.key] = param.sample(trial)
        return sampled

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def point_from(self, cfg: Config) -> dict[str, Any]:
        """The values of ``cfg`` on this space's dimensions (those inside the space's ranges)."""
        values = flatten(cfg)
        point: dict[str, Any] = {}
        for param in self.params:
            value = values[param.key]
            value = list(value) if isinstance(value, tuple) else value
            if param.active(point) and param.contains(value):
                point[param.key] = value
        return point

    def baseline_points(self) -> list[dict[str, Any]]:
        """Optuna-encoded starting points from the baseline presets, in file order."""
        here = Path(self.source).parent
        points = []
        for name in self.baselines:
            point = self.point_from(load_config(here / name))
            by_key = {p.key: p for p in self.params}
            points.append({k: by_key[k].encode(v) for k, v in point.items()})
        return points


def _parse_param(key: str, spec: Any, earlier: list[str], where: str) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}{key}: expected a mapping like {{uniform: [0, 1]}}, got {spec!r}")
    spec = dict(spec)
    condition_raw = spec.pop("if", {})
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    unknown = [k for k in spec if k not in DISTRIBUTIONS]
    if unknown or len(kinds) != 1:
        raise ConfigError(
            f"{where}{key}: give exactly one of {', '.join(DISTRIBUTIONS)} "
            f"(and optionally 'if'); got {', '.join(map(str, spec)) or 'nothing'}"
        )
    kind = kinds[0]
    values = spec[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}{key}: {kind} needs a non-empty list, got {values!r}")
    if kind != "choice":
        if len(values) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"{where}{key}: {kind} needs [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}{key}: impossible range, low {low} is not below high {high}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}{key}: loguniform needs low > 0, got {low}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}{key}: int needs integer bounds, got {values!r}")
    if not isinstance(condition_raw, dict):
        raise ConfigError(f"{where}{key}: 'if' needs a mapping {{key: value}}, got {condition_raw!r}")
    condition = []
    for other, allowed in condition_raw.items():
        if other not in earlier:
            raise ConfigError(
                f"{where}{key}: condition on {other!r}, which is not a parameter "
                "listed before it in this space"
            )
        condition.append((other, tuple(allowed) if isinstance(allowed, list) else (allowed,)))
    return Param(key, kind, tuple(values), tuple(condition))


def check_space(space: SearchSpace, base: Config) -> None:
    """Every key, and every choice or range end, must make a valid config from ``base``."""
    for param in space.params:
        for value in param.values:
            if param.kind == "int":
                value = int(value)
            elif param.kind != "choice":
                value = float(value)
            try:
                apply_overrides(base, {param.key: value})
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: parameter {param.key} = {value!r}: {exc}") from exc


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and check a space file against ``base`` (the config the samples are applied to)."""
    path = Path(path)
    where = f"{path}: "
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found (see trials/ for examples)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - {"params", "baselines"}:
        raise ConfigError(f"{where}top-level keys must be 'params' and optionally 'baselines'")
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{where}'params' must map dotted config keys to distributions")
    params: list[Param] = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(key, spec, [p.key for p in params], where))
    baselines = raw.get("baselines", []) or []
    for name in baselines:
        if not (path.parent / name).is_file():
            raise ConfigError(f"{where}baseline preset {name!r} not found beside the space file")
    space = SearchSpace(tuple(params), tuple(baselines), str(path))
    check_space(space, base)
    return space
