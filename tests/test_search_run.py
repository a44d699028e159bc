"""The driver's steps one by one, without Ray or a subprocess (MLflow is real, on SQLite)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cellseg.config import ConfigError, config_to_dict
from cellseg.data import DataError, dataset_fingerprint
from cellseg.tracking import SOURCE_TAG, Tracker, TrackingError
from cellseg.weights import MIRROR_ENV, WeightsError
from search.continuation import (
    CONTINUE,
    PARENT_SOURCE,
    RESEED,
    changed_keys,
    check_unchanged,
    next_phase,
    phase_kind,
)
from search.driver_drill import DRILL_ENV
from search.efficiency import Efficiency
from search.faults import FAULT_ENV
from search.mlflow_callback import MlflowTrialLogger
from search.mlflow_writer import JOURNAL
from search.run import (
    CLUSTER_PENDING_TRIALS,
    DEFAULT_LOGGERS_ENV,
    MLFLOW_HTTP_DEFAULTS,
    SCORE_ONLY_ENV,
    SEARCH_TAG,
    SIGINT_ENV,
    STRICT_METRIC_ENV,
    WARM_START_TAG,
    SearchOutcome,
    SearchPhases,
    build_parser,
    check_fault_drill,
    check_gpu_request,
    check_run_flags,
    check_validated,
    conclude_search,
    continued,
    data_root,
    earlier_trials,
    load_base,
    metric_every_epoch,
    new_trials,
    next_steps,
    open_parent_run,
    parent_artifacts,
    parent_closed_on_error,
    parent_params,
    parent_tags,
    pending_trials,
    reseed_best,
    restored_results,
    resume_command_for,
    run_config,
    scoped_environ,
    search_inputs,
    search_name,
    stage_weights,
    storage_paths,
    tune_environment,
    unsaved_note,
)
from search.run import main as search_main
from search.space import load_space
from search.study_file import JOURNAL_FILE
from search.summary import SearchFailed, SearchSummary
from search.tune_inference import DEFAULT_TRIALS
from search.warm_start import WarmStart
from searchutil import free_port, search_args


def test_a_search_name_is_made_unless_given_and_resume_needs_one():
    assert search_name("s1", resume=True) == "s1"
    assert search_name(None, resume=False).startswith("search-")
    with pytest.raises(ConfigError, match="--resume needs --name"):
        search_name(None, resume=True)


def test_a_malformed_or_stray_fault_drill_is_a_config_error():
    check_fault_drill(None, drill=False)
    check_fault_drill(None, drill=True)
    check_fault_drill("oom@2", drill=True)
    with pytest.raises(ConfigError, match="CELLSEG_FAULT='oom@two'"):
        check_fault_drill("oom@two", drill=True)
    with pytest.raises(ConfigError, match="CELLSEG_FAULT='oom@2' is set but --fault-drill is not"):
        check_fault_drill("oom@2", drill=False)


def test_a_dataset_without_training_images_fails_naming_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        data_root(str(tmp_path))


def test_the_base_config_takes_the_data_and_max_epochs(tiny_search, easy_root):
    cfg = load_base(tiny_search["base"], easy_root, max_epochs=5)
    assert cfg.data.root == str(easy_root) and cfg.train.epochs == 5
    assert load_base(tiny_search["base"], easy_root, max_epochs=None).train.epochs == 3


def test_the_metric_is_every_epoch_unless_validation_may_be_skipped(tmp_path, tiny_search, easy_root):
    base = load_base(tiny_search["base"], easy_root, None)
    space = load_space(tiny_search["space"], base)
    assert metric_every_epoch(base, space)
    every2 = tmp_path / "base.yaml"
    every2.write_text(tiny_search["base"].read_text().replace("epochs: 3", "epochs: 4\n  eval_every: 2"))
    assert not metric_every_epoch(load_base(every2, easy_root, None), space)
    searched = tmp_path / "space.yaml"
    searched.write_text("params:\n  train.eval_every: {choice: [1, 2]}\n")
    assert not metric_every_epoch(base, load_space(searched, base))


def test_local_and_remote_storage_paths(tmp_path):
    assert storage_paths(str(tmp_path / "st"), "s1") == (str(tmp_path / "st"), tmp_path / "st" / "s1")
    assert storage_paths("s3://bucket/x", "s1") == (
        "s3://bucket/x",
        Path.home() / ".cellseg" / "searches" / "s1",
    )


@pytest.mark.parametrize("before", [None, "0"])
def test_tunes_environment_settings_are_scoped_to_the_block(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(STRICT_METRIC_ENV, raising=False)
    else:
        monkeypatch.setenv(STRICT_METRIC_ENV, before)
    monkeypatch.delenv(SIGINT_ENV, raising=False)
    monkeypatch.delenv(SCORE_ONLY_ENV, raising=False)
    monkeypatch.delenv(DEFAULT_LOGGERS_ENV, raising=False)
    with tune_environment(strict_metrics=True):
        assert os.environ.get(STRICT_METRIC_ENV) == before and os.environ[SIGINT_ENV] == "1"
        assert os.environ[SCORE_ONLY_ENV] == "1" and os.environ[DEFAULT_LOGGERS_ENV] == "1"
    with pytest.raises(KeyboardInterrupt):
        with tune_environment(strict_metrics=False):
            assert os.environ[STRICT_METRIC_ENV] == "1" and os.environ[SIGINT_ENV] == "1"
            raise KeyboardInterrupt
    assert os.environ.get(STRICT_METRIC_ENV) == before and SIGINT_ENV not in os.environ
    assert SCORE_ONLY_ENV not in os.environ and DEFAULT_LOGGERS_ENV not in os.environ
    with tune_environment(strict_metrics=True, default_loggers=True):  # an old experiment's
        assert DEFAULT_LOGGERS_ENV not in os.environ and os.environ[SCORE_ONLY_ENV] == "1"


def test_the_parent_run_is_created_once_and_found_again_on_resume(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kwargs = dict(
        experiment="e",
        name="s1",
        params={"num_samples": 3},
        tags={"cellseg.source": "search-parent"},
        texts={"search/space.yaml": "params: {}\n"},
    )
    with pytest.raises(TrackingError, match="no search named 's1'"):
        open_parent_run(tracker, resume=True, **kwargs)
    run_id = open_parent_run(tracker, resume=False, **kwargs)
    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)
    assert run.data.tags[SEARCH_TAG] == "s1" and run.data.params == {"num_samples": "3"}
    assert [a.path for a in client.list_artifacts(run_id, "search")] == ["search/space.yaml"]
    with pytest.raises(TrackingError, match="exists already"):
        open_parent_run(tracker, resume=False, **kwargs)
    tracker.end_run(run_id, "KILLED")
    assert open_parent_run(tracker, resume=True, **kwargs) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"


def test_a_gpu_config_on_a_cluster_needs_gpus_per_trial():
    with pytest.raises(ConfigError, match="--address auto with train.device 'auto'.*--gpus-per-trial"):
        check_gpu_request(None, "auto", "auto")
    with pytest.raises(ConfigError, match="'cuda'"):
        check_gpu_request(None, "ray://head:10001", "cuda")
    check_gpu_request(0.5, "auto", "cuda")
    check_gpu_request(None, "auto", "cpu")  # a CPU config on a cluster: no GPU wanted
    check_gpu_request(None, None, "auto")  # local: the machine's own GPUs are known


def test_several_trials_may_wait_for_nodes_on_a_cluster():
    assert pending_trials(None, 0, "auto") == CLUSTER_PENDING_TRIALS > 1
    assert pending_trials(None, 0, None) == 1  # Tune's own default with a searcher
    assert pending_trials(None, 3, "auto") == 3
    assert pending_trials(5, 3, None) == 5
    with pytest.raises(ConfigError, match="--max-pending-trials"):
        pending_trials(0, 0, "auto")


def test_scoped_environ_restores_what_was_there(monkeypatch):
    monkeypatch.setenv("CELLSEG_T1", "old")
    monkeypatch.delenv("CELLSEG_T2", raising=False)
    with scoped_environ({"CELLSEG_T1": "new", "CELLSEG_T2": "x"}):
        assert os.environ["CELLSEG_T1"] == "new" and os.environ["CELLSEG_T2"] == "x"
    assert os.environ["CELLSEG_T1"] == "old" and "CELLSEG_T2" not in os.environ


def _imagenet_base(tmp_path: Path, tiny_search) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(tiny_search["base"].read_text().replace("weights: none", "weights: imagenet"))
    return base


def test_weights_of_every_backbone_in_the_space_are_staged_once(
    tmp_path, tiny_search, easy_root, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{free_port()}")  # nothing is downloaded
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for name in ("resnet18-f37072fd.pth", "resnet34-b627a593.pth"):
        (cache / name).write_bytes(b"cached")
    base = load_base(_imagenet_base(tmp_path, tiny_search), easy_root, None)
    space_file = tmp_path / "space.yaml"
    space_file.write_text("params:\n  model.backbone: {choice: [resnet18, resnet34]}\n")
    assert stage_weights(base, load_space(space_file, base)) == sorted(cache.iterdir())
    space_file.write_text("params:\n  model.backbone: {choice: [resnet18, resnet50]}\n")
    with pytest.raises(WeightsError, match="resnet50-0676ba61.pth"):
        stage_weights(base, load_space(space_file, base))
    demo = load_base(tiny_search["base"], easy_root, None)  # weights: none
    assert stage_weights(demo, load_space(tiny_search["space"], demo)) == []


def test_missing_weights_fail_the_search_before_ray_starts(
    tmp_path, tiny_search, easy_root, monkeypatch, capsys
):
    import ray

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{free_port()}")  # no network
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = search_args(easy_root, tiny_search, tmp_path / "storage", uri, "x", "w1")
    args[args.index("--base") + 1] = str(_imagenet_base(tmp_path, tiny_search))
    assert search_main(args) == 2
    err = capsys.readouterr().err
    assert "search: error: model.weights: downloading" in err and "resnet18-f37072fd.pth" in err
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


def test_a_search_refuses_a_split_without_validation(tmp_path, tiny_search, easy_root, capsys):
    """data.val_fraction 0 is for refits: a search needs the validation metric to rank trials."""

    base = load_base(tiny_search["base"], easy_root, None)
    check_validated(base, load_space(tiny_search["space"], base), tiny_search["base"])
    searched = tmp_path / "space.yaml"
    searched.write_text("params:\n  data.val_fraction: {uniform: [0.0, 0.3]}\n")
    with pytest.raises(ConfigError, match=f"{searched}: data.val_fraction may be 0"):
        check_validated(base, load_space(searched, base), tiny_search["base"])
    no_val = tmp_path / "base.yaml"
    no_val.write_text(tiny_search["base"].read_text() + "data:\n  val_fraction: 0\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = search_args(easy_root, tiny_search, tmp_path / "storage", uri, "x", "v0")
    args[args.index("--base") + 1] = str(no_val)
    assert search_main(args) == 2
    err = capsys.readouterr().err
    assert f"search: error: {no_val}: data.val_fraction may be 0" in err and "cellseg refit" in err


def test_a_negative_keep_top_fails_before_ray_starts(tmp_path, tiny_search, easy_root, capsys):
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = search_args(easy_root, tiny_search, tmp_path / "storage", uri, "x", "k1", "--keep-top", "-1")
    assert search_main(args) == 2
    assert (
        "search: error: --keep-top must be 0 (keep every checkpoint) or more, got -1"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


def test_tune_inference_takes_one_trial_or_more(tmp_path, easy_root, tiny_search, capsys):
    argv = search_args(easy_root, tiny_search, tmp_path / "storage", "sqlite:///x.db", "x", "t1")
    assert build_parser().parse_args([*argv, "--tune-inference"]).tune_inference == DEFAULT_TRIALS
    for given in ("0", "-1"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*argv, f"--tune-inference={given}"])
        assert exited.value.code == 2 and "argument --tune-inference" in capsys.readouterr().err


def _finished_search(uri: str, data: Path, files: dict[str, Path], storage: Path, *extra: str) -> str:
    """The parent run of a finished search s1 in experiment e, recorded as run.py records one
    (its flags as params, but no --keep-top as before that flag existed; its space and base
    artifacts; its dataset); its run id."""
    args = build_parser().parse_args(search_args(data, files, storage, uri, "e", "s1", *extra))
    base = load_base(files["base"], data, args.max_epochs)
    tracker = Tracker(uri)
    run_id = open_parent_run(
        tracker,
        experiment="e",
        name="s1",
        resume=False,
        params={k: v for k, v in vars(args).items() if v is not None and k != "keep_top"},
        tags={SOURCE_TAG: PARENT_SOURCE},
        texts={
            f"search/{files['space'].name}": files["space"].read_text(),
            f"search/base-{files['base'].name}": yaml.safe_dump(config_to_dict(base), sort_keys=False),
        },
        dataset=dataset_fingerprint(base.data),
    )
    tracker.end_run(run_id)
    return run_id


def _continue(uri: str, *extra: str) -> list[str]:
    return ["--continue", "s1", "--num-samples", "1", "--tracking-uri", uri, "--experiment", "e", *extra]


def test_continue_takes_the_recorded_settings_and_refuses_other_ones(
    tmp_path, mlflow_uri, easy_root, tiny_search
):
    reseeds = ("--seed", "3", "--reseed-top", "1", "--reseeds", "1", "--reseed-split")
    run_id = _finished_search(mlflow_uri, easy_root, tiny_search, tmp_path / "storage", *reseeds)
    argv = _continue(mlflow_uri)
    args, parent = continued(build_parser().parse_args(argv), argv)
    assert parent.run_id == run_id and args.name == "s1" and args.data == str(easy_root)
    assert (args.seed, args.space, args.storage) == (3, str(tiny_search["space"]), str(tmp_path / "storage"))
    assert args.keep_top == 0  # the search kept every checkpoint: so do its new trials
    assert (args.reseed_top, args.reseeds, args.reseed_split) == (1, 1, True)
    argv = _continue(mlflow_uri, "--reseeds", "3", "--seed", "3", "--data", str(easy_root))
    args, _ = continued(build_parser().parse_args(argv), argv)
    assert (args.reseed_top, args.reseeds, args.seed) == (1, 3, 3)  # re-seeding flags may change
    for flag, value, recorded in [
        ("--seed", "4", "3"),
        ("--keep-top", "5", "0"),
        ("--data", tmp_path, easy_root),
    ]:
        argv = _continue(mlflow_uri, flag, str(value))
        with pytest.raises(
            ConfigError, match=f"{flag} {value} differs from the search's recorded {flag} {recorded}"
        ):
            continued(build_parser().parse_args(argv), argv)


def test_the_resume_line_keeps_every_flag_given(tmp_path, mlflow_uri, easy_root, tiny_search):
    argv = search_args(easy_root, tiny_search, tmp_path / "storage", mlflow_uri, "e", "s1", "--keep-top", "2")
    argv += ["--address", "auto", "--time-budget", "60", "--max-pending-trials", "3", "--fault-drill"]
    line = resume_command_for(build_parser().parse_args(argv), "s1", argv)
    assert line == "python search/run.py --resume --name s1 " + " ".join(argv)

    recorded = ("--seed", "3", "--reseed-top", "1", "--ci-top", "2")
    _finished_search(mlflow_uri, easy_root, tiny_search, tmp_path / "storage", *recorded)
    argv = _continue(
        mlflow_uri, "--address", "auto", "--mlflow-wait", "5", "--min-free-gb", "1", "--reseeds", "3"
    )
    args, _ = continued(build_parser().parse_args(argv), argv)
    assert args.ci_top == 2  # the search's, not the flag's default
    line = resume_command_for(args, "s1", argv)
    assert "--continue" not in line and line.startswith("python search/run.py --resume --name s1 ")
    again = build_parser().parse_args(line.split()[2:])
    assert again.resume and again.name == "s1" and again.continue_search is None
    assert (again.address, again.mlflow_wait, again.min_free_gb, again.num_samples) == ("auto", 5, 1, 1)
    assert (again.data, again.seed, again.keep_top) == (str(easy_root), 3, 0)
    assert (again.reseed_top, again.reseeds, again.reseed_split) == (1, 3, False)
    assert (again.tracking_uri, again.experiment) == (mlflow_uri, "e")
    assert again.ci_top == 2
    argv = _continue(mlflow_uri, "--ci-top", "0")
    args, _ = continued(build_parser().parse_args(argv), argv)
    again = build_parser().parse_args(resume_command_for(args, "s1", argv).split()[2:])
    assert args.ci_top == again.ci_top == 0  # given with --continue, it wins and is kept


def test_continue_refuses_a_changed_space_base_or_dataset_before_reopening_the_search(
    tmp_path, mlflow_uri, easy_root, tiny_search, capsys
):
    import ray

    folder = Path(shutil.copytree(tiny_search["space"].parent, tmp_path / "tiny"))
    files = {key: folder / path.name for key, path in tiny_search.items()}
    run_id = _finished_search(mlflow_uri, easy_root, files, tmp_path / "storage")
    client = MlflowClient(mlflow_uri)
    space, base = files["space"].read_text(), files["base"].read_text()
    files["space"].write_text(space.replace("1.0e-5", "2.0e-5"))
    assert search_main(_continue(mlflow_uri)) == 2
    err = capsys.readouterr().err
    assert f"search: error: --continue s1: {files['space']} changed since the search started" in err
    assert f"the artifact search/space.yaml of run {run_id}" in err and "--warm-start s1" in err
    files["space"].write_text(space)
    files["base"].write_text(base.replace("epochs: 3", "epochs: 2"))
    assert search_main(_continue(mlflow_uri)) == 2
    err = capsys.readouterr().err
    assert (
        f"--continue s1: {files['base']} changed since the search started (train.epochs: 3 then, 2 now; its"
        in err
    )
    assert client.get_run(run_id).info.status == "FINISHED" and not ray.is_initialized()
    files["base"].write_text(base)
    parent = Tracker(mlflow_uri).record(run_id)
    texts = {
        a.path: client.download_artifacts(run_id, a.path, str(tmp_path / "dl"))
        for a in client.list_artifacts(run_id, "search")
    }
    texts = {k: Path(v).read_text() for k, v in texts.items()}
    check_unchanged(Tracker(mlflow_uri), parent, texts, {}, parent.fingerprint, easy_root)
    with pytest.raises(ConfigError, match=f"the dataset {easy_root} changed since the search started"):
        check_unchanged(Tracker(mlflow_uri), parent, texts, {}, "0" * 16, easy_root)


def test_mlflow_down_in_a_driver_step_leaves_the_parent_running_and_names_the_resume(mlflow_uri, monkeypatch):
    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # the driver's: a refused connection fails fast
        monkeypatch.setenv(key, value)
    tracker = Tracker(mlflow_uri)
    parent = tracker.start_run("e", "s1")
    resume = "python search/run.py --resume --name s1"
    with pytest.raises(TrackingError, match=f"unavailable .*continue with: {re.escape(resume)}$"):
        with parent_closed_on_error(tracker, parent, resume):
            Tracker(f"http://127.0.0.1:{free_port()}").records("e")  # e.g. reseed_best's read
    with pytest.raises(TrackingError, match=f"unavailable .*continue with: {re.escape(resume)}$"):
        with parent_closed_on_error(tracker, parent, resume):
            Tracker(f"http://127.0.0.1:{free_port()}").record(parent)  # an error Tracker wraps
    assert tracker.record(parent).status == "RUNNING"
    with pytest.raises(MlflowException, match="not found"):  # a refusal (404): the search failed
        with parent_closed_on_error(tracker, parent, resume):
            MlflowClient(mlflow_uri).get_run("0" * 32)
    assert tracker.record(parent).status == "FAILED"


def test_changed_keys_name_what_differs_and_what_cellseg_added() -> None:
    then = yaml.safe_dump({"data": {"root": "/d"}, "train": {"epochs": 3, "lr": [1, 2]}})
    now = yaml.safe_dump({"data": {"root": "/d", "new_setting": True}, "train": {"epochs": 3, "lr": [1, 3]}})
    assert changed_keys(then, now) == [
        "train.lr: [1, 2] then, [1, 3] now",
        "data.new_setting: absent then, true now",
    ]
    assert changed_keys(then, then) == [] and changed_keys("- a list", now) == [] == changed_keys("a: [", now)
    assert changed_keys("s: x\nn: null", "s: x y\n") == ['s: "x" then, "x y" now', "n: null then, absent now"]
    many = yaml.safe_dump({f"k{i}": i for i in range(8)})
    assert changed_keys("{}", many, shown=2) == ["k0: absent then, 0 now", "k1: absent then, 1 now", "6 more"]


def test_a_later_experiment_of_the_search_leaves_removing_checkpoints_to_its_callback(tmp_path, mlflow_uri):
    logger = MlflowTrialLogger(
        tracking_uri=mlflow_uri,
        experiment="e",
        parent_run_id="p",
        base={},
        max_epochs=1,
        metric="segm_AP50",
        journal=tmp_path / "writes",
    )
    config = run_config("s1--reseed-1", str(tmp_path), logger, max_failures=2)
    assert (config.name, config.storage_path, config.callbacks[0]) == ("s1--reseed-1", str(tmp_path), logger)
    assert [type(c).__name__ for c in config.callbacks[1:]] == ["StoredResultLogger"]  # local storage
    assert config.checkpoint_config.num_to_keep is None and config.failure_config.max_failures == 2


def test_a_search_named_like_a_later_step_is_still_its_first_experiment():
    name = "x--reseed-1"
    assert phase_kind(name, name) == ""
    assert phase_kind(name, f"{name}--continue-2") == CONTINUE
    assert next_phase(name, RESEED, []) == f"{name}--reseed-1"
    assert next_phase(name, RESEED, [f"{name}--reseed-1", f"{name}--continue-1"]) == f"{name}--reseed-2"


def test_a_continue_step_stopped_before_tune_saved_it_says_to_run_continue_again():
    note = unsaved_note("s", "s--continue-1", "/runs/s--continue-1")
    assert "/runs/s--continue-1 has no saved Tune state" in note
    assert "python search/run.py --continue s --num-samples N" in note
    assert "planned again" in unsaved_note("s", "s--reseed-1", "/runs/s--reseed-1")
    assert "add them again" not in unsaved_note("s--continue-1", "s--continue-1", "/runs/s--continue-1")


def test_drills_and_negative_counts_are_refused_before_ray_starts():
    check_run_flags(build_parser().parse_args([]), {})
    for flags, environ, message in [
        (["--ci-top", "-1"], {}, "--ci-top must be 0 (off) or more, got -1"),
        (["--keep-top", "-1"], {}, "--keep-top must be 0 (keep every checkpoint) or more, got -1"),
        ([], {FAULT_ENV: "oom@2"}, f"{FAULT_ENV}='oom@2' is set but --fault-drill is not"),
        ([], {DRILL_ENV: "s1:boom@upload"}, f"{DRILL_ENV}='s1:boom@upload': expected"),
        (["--tune-inference-ensemble", "2"], {}, "--tune-inference-ensemble needs --tune-inference"),
        (
            ["--tune-inference", "--tune-inference-ensemble", "3", "--keep-top", "2"],
            {},
            "--tune-inference-ensemble 3 needs the checkpoints of 3 trials, but --keep-top 2 keeps 2",
        ),
        (["--tune-inference", "--tune-inference-ensemble", "0"], {}, "--tune-inference-ensemble 0: give 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_run_flags(build_parser().parse_args(flags), environ)


def _args(tmp_path: Path, uri: str, data: Path, tiny_search, *extra: str):
    return build_parser().parse_args(search_args(data, tiny_search, tmp_path / "st", uri, "e", "s1", *extra))


def test_the_inputs_are_the_base_on_the_data_and_the_space(tmp_path, mlflow_uri, easy_root, tiny_search):
    inputs = search_inputs(_args(tmp_path, mlflow_uri, easy_root, tiny_search, "--max-epochs", "2"))
    assert inputs.root == easy_root.resolve() and inputs.base.data.root == str(easy_root.resolve())
    assert inputs.base.train.epochs == 2 and "optim.lr" in inputs.space.keys
    assert (inputs.base_path, inputs.space_path) == (tiny_search["base"], tiny_search["space"])
    files, texts = parent_artifacts(inputs, config_to_dict(inputs.base))
    assert files == {"search/space.yaml": tiny_search["space"], "search/base-base.yaml": tiny_search["base"]}
    assert texts["search/space.yaml"] == tiny_search["space"].read_text()
    assert yaml.safe_load(texts["search/base-base.yaml"]) == config_to_dict(inputs.base)


def test_warm_start_names_a_missing_study_and_says_nothing_without_one(
    tmp_path, mlflow_uri, easy_root, tiny_search, capsys
):
    inputs = search_inputs(_args(tmp_path, mlflow_uri, easy_root, tiny_search))
    warm = earlier_trials([], str(tmp_path / "st"), inputs)
    assert not warm.trials and not warm.carried and capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match=re.escape(f"--warm-start s0: no Optuna study file {tmp_path}")):
        earlier_trials(["s0"], str(tmp_path / "st"), inputs)


def test_the_parent_run_records_the_flags_given_and_where_it_ran(
    tmp_path, mlflow_uri, easy_root, tiny_search
):
    args = _args(tmp_path, mlflow_uri, easy_root, tiny_search)
    params = parent_params(args, "s2")
    assert params["name"] == "s2" and params["num_samples"] == 40 and "address" not in params
    tags = parent_tags(WarmStart(), {"CPU": 2.0}, ["search/run.py", "--seed", "1"])
    assert tags[SOURCE_TAG] == PARENT_SOURCE and WARM_START_TAG not in tags
    assert (tags["ray.cluster_resources"], tags["command"]) == ("{'CPU': 2.0}", "search/run.py --seed 1")
    assert parent_tags(WarmStart(carried={"s0": 3}), {}, [])[WARM_START_TAG] == "s0 (3 trials)"


def _phases(tmp_path: Path, uri: str, data: Path, tiny_search, *extra: str) -> SearchPhases:
    """The shared state of search s1 (a new parent run), as run_search builds it, without Ray."""
    args = _args(tmp_path, uri, data, tiny_search, *extra)
    inputs = search_inputs(args)
    tracker = Tracker(uri)
    parent = open_parent_run(tracker, experiment="e", name="s1", resume=False, params={}, tags={}, texts={})
    storage_path, local_dir = storage_paths(args.storage, "s1")
    local_dir.mkdir(parents=True, exist_ok=True)
    base = config_to_dict(inputs.base)
    return SearchPhases(args, "s1", tracker, parent, inputs, base, storage_path, local_dir, 1, trainable=None)


def test_each_experiment_gets_its_own_trial_logger(tmp_path, mlflow_uri, easy_root, tiny_search):
    search = _phases(tmp_path, mlflow_uri, easy_root, tiny_search, "--keep-top", "3")
    assert search.study_file == tmp_path / "st" / "s1" / JOURNAL_FILE
    logger = search.trial_logger("s1--continue-1")
    assert (logger.phase, logger.spec.keep_top, logger.spec.search_name) == ("s1--continue-1", 3, "s1")
    assert logger.journal == tmp_path / "st" / "s1" / JOURNAL
    assert search.trial_logger("s1--reseed-1", keep_top=0).spec.keep_top == 0


def test_a_resumed_search_finds_its_study_ready_before_tune_restores_the_searcher(
    tmp_path, mlflow_uri, easy_root, tiny_search
):
    """Tune's restored searcher opens the journal itself: a cut last line, which a power loss
    during an append can leave, is gone before then."""
    journal = tmp_path / "st" / "s1" / JOURNAL_FILE
    journal.parent.mkdir(parents=True)
    journal.write_bytes(b'{"op_code": 0}\n{"op_co')
    _phases(tmp_path, mlflow_uri, easy_root, tiny_search)
    assert journal.read_bytes() == b'{"op_code": 0}\n'


def test_a_resume_restores_every_saved_experiment_and_adds_no_trials(
    tmp_path, mlflow_uri, easy_root, tiny_search, capsys
):
    search = _phases(tmp_path, mlflow_uri, easy_root, tiny_search, "--resume")
    phases = ["s1--continue-1"]
    assert restored_results(search, phases) == []
    out = capsys.readouterr().out
    for phase in ("s1", "s1--continue-1"):
        assert f"{tmp_path / 'st' / phase} has no saved Tune state" in out
    assert new_trials(search, phases, WarmStart()) == [] and phases == ["s1--continue-1"]
    search.args.resume = False
    assert restored_results(search, phases) == [] and capsys.readouterr().out == ""  # a new search


def test_mlflow_down_before_continue_records_its_step_says_no_trials_ran(
    tmp_path, mlflow_uri, easy_root, tiny_search, monkeypatch
):
    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # the driver's: a refused connection fails fast
        monkeypatch.setenv(key, value)
    search = _phases(tmp_path, mlflow_uri, easy_root, tiny_search, "--continue", "s1", "--num-samples", "3")
    search.tracker = Tracker(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match=r"so none ran\. .* --continue s1 --num-samples 3$"):
        new_trials(search, [], WarmStart())


def test_reseeding_with_no_trial_that_ran_every_epoch_starts_no_experiment(
    tmp_path, mlflow_uri, easy_root, tiny_search, capsys
):
    search = _phases(tmp_path, mlflow_uri, easy_root, tiny_search, "--reseed-top", "2")
    phases: list[str] = []
    reseed_best(search, phases, [])
    assert "nothing to re-seed: the best 2 trials" in capsys.readouterr().out and phases == []
    (search.local_dir / JOURNAL).mkdir()
    (search.local_dir / JOURNAL / "1.jsonl").write_text('["tags", {"trial_id": "t", "tags": {}}]\n')
    with pytest.raises(TrackingError, match="MLflow writes are still queued|stayed unavailable"):
        reseed_best(search, phases, [])


def test_a_search_whose_trials_reported_nothing_fails_without_finishing_its_parent(
    tmp_path, mlflow_uri, easy_root, tiny_search
):
    search = _phases(tmp_path, mlflow_uri, easy_root, tiny_search)
    with pytest.raises(SearchFailed, match="no trial reported segm_AP50 \\(0 trials ended\\)"):
        conclude_search(search, [], started=0.0, slots=1)
    assert search.tracker.record(search.parent_run_id).status == "RUNNING"


def test_the_outcome_prints_the_summary_then_the_choice_and_trust_lines():
    summary = SearchSummary(2, 0, "t1", "a", 0.5, {"optim.lr": 0.01}, "ck", 3, 6, 120.0, chosen_by="mean")
    spent = Efficiency(busy_s=60, trial_s=100, wall_s=120, slots=1)
    lines = SearchOutcome(summary, spent, None, ["trust"]).lines("segm_AP50")
    assert lines == [*summary.lines("segm_AP50"), spent.line(), "trust"]
    assert lines[1] == "chosen run: t1  segm_AP50 0.5000 (mean)"


def test_the_next_steps_name_the_store_and_the_data():
    local = next_steps("sqlite:///m.db", "e", "7", "/d", Path("/st/s1/optuna.journal"))
    assert "mlflow ui --backend-store-uri sqlite:///m.db" in local[0] and "#/experiments/7/runs" in local[0]
    assert "cellseg export --best --data /d --experiment e --tracking-uri sqlite:///m.db" in local[1]
    assert "cellseg refit --best --data /d" in local[2]
    assert "optuna-dashboard /st/s1/optuna.journal --host 127.0.0.1" in local[3]
    remote = next_steps("http://mlflow:5000/", "e", "7", "/d", Path("/st/s1/optuna.db"))
    assert (
        remote[0]
        == "compare trials: open http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert "optuna-dashboard sqlite:////st/s1/optuna.db --host" in remote[3]
