"""A search whose trials validate every second epoch (train.eval_every: 2)."""

from __future__ import annotations

import optuna
import pytest
import ray

from search.run import main as search_main
from search.study_file import JOURNAL_FILE, open_study_storage
from searchutil import epochs_of, search_args, search_runs, tied_at

pytestmark = pytest.mark.slow


def test_asha_and_optuna_use_the_validated_epochs_only(tmp_path, easy_root, tiny_search, monkeypatch):
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "0")  # restored after the test
    base = tmp_path / "base.yaml"
    base.write_text(tiny_search["base"].read_text().replace("epochs: 3", "epochs: 4\n  eval_every: 2"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        code = search_main(
            search_args(
                easy_root,
                {**tiny_search, "base": base},
                tmp_path / "storage",
                uri,
                "every2",
                "s1",
                "--num-samples",
                "4",
                "--grace-period",
                "1",
                "--reduction-factor",
                "2",
                "--seed",
                "3",
            )
        )
    finally:
        ray.shutdown()
    assert code == 0
    client, [parent], children = search_runs(uri, "every2", "s1")
    assert parent.info.status == "FINISHED" and len(children) == 4
    stopped = 0
    for child in children:
        trained = epochs_of(client, child, "train_loss")
        assert trained == list(range(1, len(trained) + 1))
        assert epochs_of(client, child) == [e for e in trained if e % 2 == 0]
        assert len(trained) in (2, 4)  # ASHA decides on validated epochs only
        stopped += len(trained) == 2
    if tied_at(client, children, [2]):  # every trial scored the same at the rung: none stopped
        assert stopped == 0
    else:
        assert stopped > 0
    study = optuna.load_study(
        study_name="s1", storage=open_study_storage(tmp_path / "storage" / "s1" / JOURNAL_FILE)
    )
    by_lr = {t.params["optim.lr"]: t for t in study.trials}
    for child in children:
        trial = by_lr[float(child.data.params["optim.lr"])]
        assert sorted(trial.intermediate_values) == epochs_of(client, child)
