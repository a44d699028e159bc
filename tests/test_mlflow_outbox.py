"""The outbox keeps MLflow writes in order while the store is unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cellseg.errors import TrackingError
from cellseg.tracking import is_unavailable
from search.mlflow_outbox import Outbox


class Store:
    """A stand-in tracking store that is down until ``up`` is set."""

    def __init__(self) -> None:
        self.up = True
        self.applied: list[tuple[str, dict]] = []

    def apply(self, name: str, **kwargs) -> None:
        if not self.up:
            raise MlflowException("API request failed: connection refused")
        if kwargs.get("bad"):
            raise MlflowException("bad value", INVALID_PARAMETER_VALUE)
        self.applied.append((name, kwargs))


def test_writes_wait_in_order_while_down(tmp_path: Path) -> None:
    store = Store()
    outbox = Outbox(store.apply, retry_after_s=0)
    assert outbox.put("start", trial_id="a")
    store.up = False
    assert not outbox.put("result", trial_id="a", epoch=1)
    assert not outbox.put("result", trial_id="a", epoch=2)
    assert [kw.get("epoch") for _, kw in outbox.pending] == [1, 2]
    store.up = True
    assert outbox.flush()
    assert [kw.get("epoch") for _, kw in store.applied] == [None, 1, 2]


def test_a_refused_write_is_dropped_not_retried_forever(tmp_path: Path) -> None:
    store = Store()
    outbox = Outbox(store.apply)
    assert outbox.put("tags", trial_id="a", bad=True)
    assert outbox.put("tags", trial_id="a")
    assert store.applied == [("tags", {"trial_id": "a"})]


def test_retries_wait_for_the_interval_unless_forced_and_stop_once_through(tmp_path: Path) -> None:
    store = Store()
    store.up = False
    outbox = Outbox(store.apply, retry_after_s=3600)
    assert not outbox.put("start", trial_id="a")
    store.up = True
    assert not outbox.flush()
    assert outbox.drain(timeout_s=0)
    assert store.applied == [("start", {"trial_id": "a"})]
    assert outbox.put("result", trial_id="a")  # reachable again: no wait for the interval
    assert store.applied[-1] == ("result", {"trial_id": "a"})


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    """``exc`` raised from ``cause``."""
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc, unavailable",
    [
        (MlflowException("boom"), True),
        (MlflowException("bad", INVALID_PARAMETER_VALUE), False),
        (ConnectionRefusedError(), True),
        (KeyError("x"), False),
        (caused(TrackingError("no run r1"), MlflowException("boom")), True),  # Tracker.record's
        (caused(TrackingError("no run r1"), MlflowException("bad", INVALID_PARAMETER_VALUE)), False),
        (TrackingError("no such experiment"), False),
    ],
)
def test_unavailable_means_retry_later(exc: BaseException, unavailable: bool) -> None:
    assert is_unavailable(exc) is unavailable


def test_prepare_goes_once_before_the_first_write_and_is_retried_while_down() -> None:
    store = Store()
    store.up = False
    outbox = Outbox(store.apply, retry_after_s=0, prepare=lambda: store.apply("load"))
    assert not outbox.put("start", trial_id="a")
    assert not outbox.put("result", trial_id="a", epoch=1)
    assert store.applied == [] and len(outbox.pending) == 2
    store.up = True
    assert outbox.flush()
    assert outbox.put("result", trial_id="a", epoch=2)
    assert [name for name, _ in store.applied] == ["load", "start", "result", "result"]


def test_a_prepare_refused_for_good_raises_and_keeps_the_writes() -> None:
    store = Store()
    outbox = Outbox(store.apply, prepare=lambda: store.apply("load", bad=True))
    with pytest.raises(MlflowException, match="bad value"):
        outbox.put("start", trial_id="a")
    assert list(outbox.pending) == [("start", {"trial_id": "a"})] and store.applied == []
