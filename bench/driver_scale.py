"""Driver scale: the search driver's own cost per result and per trial as finished trials pile up.

Runs ``--trials`` trials of up to ``--max-epochs`` (24) reported epochs of a trivial trainable
(no model: each epoch's metrics are a formula of the sampled parameters plus seeded noise, under
the names the real trainable reports, with a tiny ``best.pt`` and ``last.pt`` as its checkpoint)
through the search driver's own pieces from ``search/run.py`` with its flags' defaults: a
``SearchPhases`` (the demo space, the Optuna searcher with PRUNED for trials ASHA stops, its
study in a journal file, ASHA, the MLflow callback and its writer process on a SQLite store and
``--keep-top``, Tune's storage and environment), and at the end ``finish_search``. Ray runs
locally with 2 CPUs (``--max-concurrent`` trials at a time). Prints, per bucket of finished trials
(ending at a tenth, three tenths and all of ``--trials``): the driver process's CPU time per
result and per trial, its wall time per result, the time inside the MLflow callback per result,
its main thread's CPU time and the time in Python's garbage collector per trial, and its resident
memory; then the peak driver RSS, the MLflow writer process's CPU time (from the resources of the
driver's children ended during the fit) and the stores' sizes; then the main thread's CPU time
per trial inside chosen Tune, Optuna and search functions (``WATCHED``), and the CPU time per
trial of each of the driver's threads (grouped by name) and of the writer process. The ratio
lines are the driver's CPU time per result and per trial in the last bucket against the second
(1.00x: flat; the first holds Ray's start and the two baselines, which run every epoch). Both are
needed: most of the driver's work comes with a trial's start and end, so when later trials
report fewer epochs (ASHA stops them sooner), the cost per result rises while the cost per trial
does not, and the other way round when they report more.

``--no-mlflow-writes`` runs the same driver with the MLflow callback deciding every write but
handing none to the writer process: the floor that journal, pipe and MLflow's store sit on.

    python bench/driver_scale.py [--tiny] [--trials N] [--max-epochs E] [--no-mlflow-writes] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import re
import resource
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.execution.tune_controller import TuneController
from ray.tune.schedulers import AsyncHyperBandScheduler

import common
from cellseg.checkpoint import BEST, LAST, save_checkpoint
from cellseg.config import config_to_dict
from cellseg.data import make_synthetic_dataset
from cellseg.task import metric_names
from cellseg.tracking import Tracker
from search.bounded_history import BoundedHistory, BoundedHistorySampler
from search.efficiency import trial_slots
from search.mlflow_callback import MlflowTrialLogger
from search.run import (
    SearchPhases,
    build_parser,
    check_writes_applied,
    ended_trials,
    finish_search,
    open_parent_run,
    pending_trials,
    search_inputs,
    storage_paths,
)
from search.scheduler import SearchScheduler
from search.searcher import StudySearcher
from search.trainable import WORKER_RUNTIME_ENV

NAME = "driver-scale"
EXPERIMENT = "driver-scale"
SPACE = common.TRIALS / "space_demo.yaml"
BASE = common.TRIALS / "demo.yaml"
LOSSES = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
STEPS = 200  # best.pt files made once, for metric values 0, 1/STEPS, ..., 1


def trivial_trial(
    config: dict[str, Any],
    *,
    epochs: int,
    metric: str,
    names: list[str],
    bests: dict[int, bytes],
) -> None:
    """A trial without a model: ``metric`` approaches a value set by ``config`` with seeded noise,
    reported as the real trial reports (``search.tune_report``).

    Its ``best.pt`` is one of ``bests`` (made by the driver, keyed by the metric in 1/STEPS steps).
    """
    import ray
    from ray import tune

    from search.tune_report import tune_result

    node_id = ray.get_runtime_context().get_node_id()  # reported with every epoch, as the real trial does

    lr = float(config.get("optim.lr", 1e-3))
    final = common.final_value(config)
    rng = random.Random(zlib.crc32(repr(sorted(config.items())).encode()))
    folder = Path(tempfile.mkdtemp(prefix="trial-", dir=os.environ["DRIVER_SCALE_SCRATCH"]))
    best = -1.0
    for epoch in range(1, epochs + 1):
        value = common.epoch_value(final, epoch, rng)
        metrics = {name: value * (0.6 if "AP50" not in name else 1.0) for name in names}
        metrics.update({f"train_{k}": 2.0 / epoch + rng.random() * 0.01 for k in LOSSES})
        metrics.update({"epoch": float(epoch), "lr": lr, "epoch_train_s": 0.01, "epoch_val_s": 0.01})
        metrics[metric] = value
        if value > best:
            best = value
            (folder / BEST).write_bytes(bests[round(value * STEPS)])
        (folder / LAST).write_bytes(b"\0" * 1024)
        tune.report(
            tune_result(metrics, metric=metric, node_id=node_id),
            checkpoint=tune.Checkpoint.from_directory(str(folder)),
        )


@dataclass
class Sample:
    """The driver's clocks when a trial ended."""

    finished: int
    results: int
    cpu_s: float
    main_cpu_s: float
    gc_s: float
    wall_s: float
    callback_s: float
    rss_mb: float


class GcClock:
    """The wall time the driver spends in Python's cyclic garbage collector (all generations)."""

    def __init__(self) -> None:
        self.total_s, self._started = 0.0, 0.0
        gc.callbacks.append(self._phase)

    def close(self) -> None:
        gc.callbacks.remove(self._phase)

    def _phase(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._started


class ThreadClocks:
    """The driver's CPU time per thread at each bucket's end, threads grouped by name (a Python
    thread's name without its number; others by their system name), and the MLflow writer
    process's, so that what grows outside the main thread can be named. A thread that ended
    keeps the CPU it was last seen with in its group; ``(rest)`` is what no look saw (threads that
    lived between two looks, rounding to clock ticks)."""

    TICK_S = 1 / os.sysconf("SC_CLK_TCK")

    def __init__(self, ends: list[int], writer: Callable[[], Any]) -> None:
        self.ends = set(ends)
        self.writer = writer  # the writer process, or None before it starts
        self.seen: dict[tuple[int, int], tuple[str, float]] = {}  # (tid, start) -> (group, CPU s)
        self.snapshots: list[tuple[int, dict[str, float]]] = [(0, self.now())]

    @classmethod
    def cpu_s(cls, stat: Path) -> tuple[float, int]:
        """User and system CPU seconds in a ``/proc`` ``stat`` file, and the start time."""
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * cls.TICK_S, int(fields[19])

    def now(self) -> dict[str, float]:
        """CPU seconds per thread group of this process and of the writer process while it runs."""
        names = {t.native_id: re.sub(r"^(Thread|Dummy)-\d+ ?", "", t.name) for t in threading.enumerate()}
        names[threading.main_thread().native_id] = "(main)"
        for task in Path("/proc/self/task").iterdir():
            try:
                (cpu, start), comm = self.cpu_s(task / "stat"), (task / "comm").read_text().strip()
            except FileNotFoundError:  # ended meanwhile
                continue
            tid = int(task.name)
            group = names.get(tid) or re.sub(r"[\d.:_-]+$", "", comm)
            self.seen[tid, start] = group, cpu
        groups: dict[str, float] = {}
        for group, cpu in self.seen.values():
            groups[group] = groups.get(group, 0.0) + cpu
        groups["(rest)"] = max(0.0, time.process_time() - sum(groups.values()))
        process = getattr(self.writer(), "process", None)
        if process is not None and process.poll() is None:
            groups["(MLflow writer process)"] = self.cpu_s(Path(f"/proc/{process.pid}/stat"))[0]
        return groups

    def sample(self, sample: Sample) -> None:
        if sample.finished in self.ends:
            self.snapshots.append((sample.finished, self.now()))

    def growth(self, top: int = 12) -> tuple[list[str], list[list[Any]]]:
        """The buckets, and the thread groups by CPU ms per finished trial in each (the ``top``
        largest in the last bucket)."""
        pairs = list(zip(self.snapshots, self.snapshots[1:], strict=False))
        per_trial = [
            {g: 1000 * (after[g] - before.get(g, 0.0)) / max(n1 - n0, 1) for g in after}
            for (n0, before), (n1, after) in pairs
        ]
        groups = sorted(per_trial[-1], key=per_trial[-1].get, reverse=True)[:top]
        buckets = [f"{n0 + 1}-{n1}" for (n0, _), (n1, _) in pairs]
        return buckets, [[g, *(bucket.get(g, 0.0) for bucket in per_trial)] for g in groups]


class FunctionClocks:
    """The CPU time of the calling thread inside chosen functions (their calls included), and the
    items of the lists they return, at each bucket's end: what grows in the driver without a
    profiler's distortion. The functions are wrapped where they are defined while it is active."""

    def __init__(self, ends: list[int], functions: dict[str, tuple[type, str]]) -> None:
        self.ends, self.functions = set(ends), functions
        self.cpu_s = dict.fromkeys(functions, 0.0)
        self.calls = dict.fromkeys(functions, 0)
        self.items = dict.fromkeys(functions, 0)
        self.snapshots: list[tuple[int, dict[str, tuple[float, int, int]]]] = [(0, self._now())]
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> FunctionClocks:
        for label, (owner, name) in self.functions.items():
            self._originals[label] = owner.__dict__[name]
            setattr(owner, name, self._timed(label, owner.__dict__[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for label, (owner, name) in self.functions.items():
            setattr(owner, name, self._originals[label])

    def _timed(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                out = function(*args, **kwargs)
            finally:
                self.cpu_s[label] += time.thread_time() - start
                self.calls[label] += 1
            if isinstance(out, list):
                self.items[label] += len(out)
            return out

        return timed

    def _now(self) -> dict[str, tuple[float, int, int]]:
        return {label: (self.cpu_s[label], self.calls[label], self.items[label]) for label in self.functions}

    def sample(self, sample: Sample) -> None:
        if sample.finished in self.ends:
            self.snapshots.append((sample.finished, self._now()))

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """The buckets, and per function its CPU ms per finished trial in each, then its calls
        per finished trial and the items it returned per call in the last bucket."""
        pairs = list(zip(self.snapshots, self.snapshots[1:], strict=False))
        rows = []
        for label in self.functions:
            per_trial, calls, items = [], 0, 0
            for (n0, before), (n1, after) in pairs:
                per_trial.append(1000 * (after[label][0] - before[label][0]) / max(n1 - n0, 1))
                calls, items = after[label][1] - before[label][1], after[label][2] - before[label][2]
            trials = max(pairs[-1][1][0] - pairs[-1][0][0], 1)
            rows.append([label, *per_trial, calls / trials, items / max(calls, 1)])
        return [f"{n0 + 1}-{n1}" for (n0, _), (n1, _) in pairs], rows


# where the driver's main thread spends its time: the search's own pieces, Optuna's and Tune's
WATCHED = {
    "scheduler.choose_trial_to_run": (SearchScheduler, "choose_trial_to_run"),
    "Tune: ASHA on_trial_result": (AsyncHyperBandScheduler, "on_trial_result"),
    "Tune: controller._maybe_update_trial_queue": (TuneController, "_maybe_update_trial_queue"),
    "Tune: controller._maybe_add_actors": (TuneController, "_maybe_add_actors"),
    "Tune: controller.checkpoint (its state)": (TuneController, "checkpoint"),
    "Tune: controller._process_trial_result": (TuneController, "_process_trial_result"),
    "searcher.suggest": (StudySearcher, "suggest"),
    "searcher.on_trial_result": (StudySearcher, "on_trial_result"),
    "searcher.on_trial_complete": (StudySearcher, "on_trial_complete"),
    "Optuna: Study.ask": (optuna.Study, "ask"),
    "Optuna: JournalStorage.get_all_trials": (optuna.storages.JournalStorage, "get_all_trials"),
    "bounded history (items: trials TPE sees)": (BoundedHistory, "__call__"),
    "TPE: sample_relative": (BoundedHistorySampler, "sample_relative"),
    "MLflow callback: on_step_end": (MlflowTrialLogger, "on_step_end"),
}


class TimedTrialLogger(MlflowTrialLogger):
    """The search's MLflow callback, timing its own result and end hooks and sampling the driver's
    clocks at every trial's end (then calling each of ``on_sample`` with the sample)."""

    samples: list[Sample]
    results: int
    callback_s: float
    gc_clock: GcClock
    on_sample: list[Callable[[Sample], None]]

    @classmethod
    def like(cls, logger: MlflowTrialLogger) -> TimedTrialLogger:
        """A timed callback with ``logger``'s settings."""
        timed = cls.__new__(cls)
        timed.__dict__.update(vars(logger))
        timed.samples, timed.results, timed.callback_s, timed.on_sample = [], 0, 0.0, []
        timed.gc_clock = GcClock()
        return timed

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_trial_result(*args, **kwargs)
        self.results += 1
        self.callback_s += time.perf_counter() - start

    def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
        self._timed_end(super().on_trial_complete, *args, **kwargs)

    def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
        self._timed_end(super().on_trial_error, *args, **kwargs)

    def _timed_end(self, hook: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        self.callback_s += time.perf_counter() - start
        self.samples.append(
            Sample(
                len(self.samples) + 1,
                self.results,
                time.process_time(),
                time.thread_time(),
                self.gc_clock.total_s,
                time.perf_counter(),
                self.callback_s,
                rss_mb(),
            )
        )
        for hook in self.on_sample:
            hook(self.samples[-1])


class UnsentWrites:
    """A stand-in for the MLflow writer that numbers each write and sends none."""

    sent = 0

    def put(self, op: str, /, **kwargs: Any) -> int:
        self.sent += 1
        return self.sent

    def answers(self) -> list[list[Any]]:
        return []

    def wait(self, timeout_s: float) -> tuple[bool, list[list[Any]]]:
        return True, []

    close = wait


class UnwrittenTrialLogger(TimedTrialLogger):
    """A :class:`TimedTrialLogger` that decides every write as the search does and hands none to
    the MLflow writer process (``--no-mlflow-writes``): the driver's cost without journal, pipe
    and store. Ended trials' checkpoints then stay in Tune's storage (their removal follows the
    MLflow close)."""

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = UnsentWrites()
        return self._writer


class TimedSearch(SearchPhases):
    """The search's phases, each experiment's MLflow callback a :class:`TimedTrialLogger` (of
    class ``logger_class``)."""

    logger: TimedTrialLogger
    logger_class: type[TimedTrialLogger] = TimedTrialLogger

    def trial_logger(self, *args: Any, **kwargs: Any) -> MlflowTrialLogger:
        self.logger = self.logger_class.like(super().trial_logger(*args, **kwargs))
        return self.logger


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def best_files(metric: str) -> dict[int, bytes]:
    """A tiny ``best.pt`` (a cellseg checkpoint without weights) for each metric step."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for step in range(STEPS + 1):
            path = save_checkpoint(
                Path(tmp) / BEST, {"config": {}, "model": {}, "epoch": 0, "metrics": {metric: step / STEPS}}
            )
            files[step] = path.read_bytes()
        return files


def bucket_rows(samples: list[Sample], start: Sample, ends: list[int]) -> list[list[Any]]:
    """One row per bucket of finished trials ending at each of ``ends``."""
    rows, before = [], start
    for end in ends:
        last = samples[min(end, len(samples)) - 1]
        results, trials = last.results - before.results, last.finished - before.finished
        if not results:
            continue
        cpu = last.cpu_s - before.cpu_s
        rows.append(
            [
                f"{before.finished + 1}-{last.finished}",
                results,
                1000 * cpu / results,
                1000 * (last.wall_s - before.wall_s) / results,
                1000 * (last.callback_s - before.callback_s) / results,
                cpu / trials,
                (last.main_cpu_s - before.main_cpu_s) / trials,
                1000 * (last.gc_s - before.gc_s) / trials,
                last.rss_mb,
            ]
        )
        before = last
    return rows


class BucketProfile:
    """A cProfile of the driver's main thread in that thread's CPU time (waits cost nothing), its
    statistics kept at each bucket's end, so that what grows from one bucket to the next can be
    named."""

    def __init__(self, ends: list[int]) -> None:
        self.ends = set(ends)
        self.profile = cProfile.Profile(time.thread_time)
        self.snapshots: list[tuple[int, dict[Any, tuple]]] = [(0, {})]  # (finished trials, stats)

    def sample(self, sample: Sample) -> None:
        if sample.finished in self.ends:
            self.profile.create_stats()  # stops the profile
            self.snapshots.append((sample.finished, dict(self.profile.stats)))  # type: ignore[attr-defined]
            self.profile.enable()

    def buckets(self) -> list[str]:
        """The profiled buckets of finished trials, as ``first-last``."""
        return [
            f"{n0 + 1}-{n1}" for (n0, _), (n1, _) in zip(self.snapshots, self.snapshots[1:], strict=False)
        ]

    def growth(self, top: int = 15) -> list[list[Any]]:
        """The functions whose inclusive CPU time per finished trial grew most from the second
        bucket to the last: name, ms/trial in each of :meth:`buckets`."""
        per_trial = []
        for (n0, before), (n1, after) in zip(self.snapshots, self.snapshots[1:], strict=False):
            trials = max(n1 - n0, 1)
            per_trial.append(
                {
                    key: 1000 * (value[3] - before.get(key, (0, 0, 0, 0))[3]) / trials
                    for key, value in after.items()
                }
            )
        first, last = per_trial[min(1, len(per_trial) - 1)], per_trial[-1]
        grown = sorted(last, key=lambda key: last[key] - first.get(key, 0.0), reverse=True)[:top]
        return [
            [pstats.func_std_string(key)[-70:], *(bucket.get(key, 0.0) for bucket in per_trial)]
            for key in grown
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="12 trials of up to 3 epochs: seconds")
    parser.add_argument("--trials", type=int, help="trials to run (default 200; 12 with --tiny)")
    parser.add_argument(
        "--max-epochs", type=int, help="epochs of a trial ASHA never stops (default 24; 3 with --tiny)"
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=2, help="trials at a time (Ray gets 2 CPUs); default 2"
    )
    parser.add_argument("--keep-top", type=int, default=5, help="as search/run.py's --keep-top (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    parser.add_argument(
        "--no-mlflow-writes",
        action="store_true",
        help="the MLflow callback applies none of its writes (a floor: what the driver costs without "
        "MLflow's store; nothing is recorded, so the search's summary is skipped)",
    )
    parser.add_argument(
        "--profile",
        help="write cProfile statistics of the driver's main thread (its CPU time) to this file, and "
        "print the functions whose time per trial grew most from the second bucket to the last",
    )
    args = parser.parse_args()
    trials = args.trials or (12 if args.tiny else 200)
    epochs = args.max_epochs or (3 if args.tiny else 24)
    if trials < 1 or epochs < 1:
        parser.error("--trials and --max-epochs must be at least 1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    import ray

    print(common.machine())
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        folder = Path(tmp)
        os.environ["DRIVER_SCALE_SCRATCH"] = str(folder / "scratch")  # the trials' workers inherit it
        (folder / "scratch").mkdir()
        data = make_synthetic_dataset(folder / "data", seed=0, n_train=4, n_test=1, max_side=64, max_cells=5)
        flags = [
            *("--data", str(data), "--space", str(SPACE), "--base", str(BASE)),
            *("--num-samples", str(trials), "--max-epochs", str(epochs), "--seed", str(args.seed)),
            *("--max-concurrent", str(args.max_concurrent), "--keep-top", str(args.keep_top)),
            *("--storage", str(folder / "storage"), "--experiment", EXPERIMENT, "--name", NAME),
        ]
        run_args = build_parser().parse_args(flags)  # search/run.py's defaults for the rest
        inputs = search_inputs(run_args)
        metric = inputs.base.train.metric
        storage_path, local_dir = storage_paths(run_args.storage, NAME)
        local_dir.mkdir(parents=True)
        tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
        parent_run_id = open_parent_run(
            tracker,
            experiment=EXPERIMENT,
            name=NAME,
            resume=False,
            params={"trials": trials},
            tags={},
            texts={},
        )
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=WORKER_RUNTIME_ENV,  # search/, as the search ships it
        )
        per_trial = {"CPU": 2 / args.max_concurrent, "GPU": 0.0}
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(
                trivial_trial,
                epochs=epochs,
                metric=metric,
                names=list(metric_names()),
                bests=best_files(metric),
            ),
            {"cpu": per_trial["CPU"]},
        )
        search = TimedSearch(
            args=run_args,
            name=NAME,
            tracker=tracker,
            parent_run_id=parent_run_id,
            inputs=inputs,
            base_dict=config_to_dict(inputs.base),
            storage_path=storage_path,
            local_dir=local_dir,
            max_pending=pending_trials(None, args.max_concurrent, None),
            trainable=trainable,
        )
        if args.no_mlflow_writes:
            search.logger_class = UnwrittenTrialLogger
        tuner = search.search_tuner(NAME, seed=args.seed)
        print(
            f"{trials} trials of up to {epochs} epochs, {args.max_concurrent} at a time, in {folder}",
            flush=True,
        )
        ends = sorted({max(1, trials // 10), max(1, 3 * trials // 10), trials})
        start = Sample(
            0,
            0,
            time.process_time(),
            time.thread_time(),
            search.logger.gc_clock.total_s,
            time.perf_counter(),
            0.0,
            rss_mb(),
        )
        threads = ThreadClocks(ends, lambda: search.logger._writer)  # not .writer: that starts it
        functions = FunctionClocks(ends, WATCHED)
        search.logger.on_sample += [threads.sample, functions.sample]
        profile = BucketProfile(ends) if args.profile else None
        if profile:
            search.logger.on_sample.append(profile.sample)
            profile.profile.enable()
        children_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        with functions:
            results = search.fit(tuner)
        search.logger.gc_clock.close()
        fit_s = time.perf_counter() - start.wall_s
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the writer: ended and reaped
        writer_s = children.ru_utime + children.ru_stime - children_start.ru_utime - children_start.ru_stime
        check_writes_applied(local_dir, tracker, NAME)
        finish_start = time.perf_counter()
        if not args.no_mlflow_writes:
            finish_search(
                tracker,
                parent_run_id,
                results,
                name=NAME,
                metric=metric,
                max_epochs=epochs,
                local_dir=local_dir,
                experiment=EXPERIMENT,
                started=start.wall_s,
                trained=search.trained,
                slots=trial_slots(ray.cluster_resources(), per_trial, args.max_concurrent, trials),
            )
        finish_s = time.perf_counter() - finish_start
        if profile:
            profile.profile.disable()
            profile.profile.dump_stats(args.profile)
        ray.shutdown()
        ended = ended_trials(tracker, EXPERIMENT, parent_run_id)
        sizes = {
            "MLflow store (mlflow.db)": (folder / "mlflow.db").stat().st_size,
            "MLflow artifacts": common_size(folder / "mlartifacts"),
            "Optuna study": search.study_file.stat().st_size,
            "Tune storage (with the study)": common_size(Path(storage_path)),
        }
    logger = search.logger
    samples = logger.samples
    print(
        f"{len(samples)} trials ended, {logger.results} results, {len(ended)} runs exportable; Tuner.fit {fit_s:.1f} s"
    )
    common.print_table(
        [
            "finished trials",
            "results",
            "driver CPU ms/result",
            "wall ms/result",
            "MLflow callback ms/result",
            "driver CPU s/trial",
            "main thread CPU s/trial",
            "GC ms/trial",
            "driver RSS MiB",
        ],
        bucket_rows(samples, start, ends),
    )
    common.print_table(
        ["figure", "value"],
        [
            ["peak driver RSS (MiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
            ["finish_search (s)", finish_s],
            ["MLflow writer process CPU s/trial", writer_s / max(len(samples), 1)],
            ["MLflow writer process CPU ms/result", 1000 * writer_s / max(logger.results, 1)],
            *[[f"{name} (MB)", size / 1e6] for name, size in sizes.items()],
        ],
    )
    buckets, function_rows = functions.rows()
    print("the driver's main thread inside chosen functions: CPU ms per finished trial")
    common.print_table(["function", *buckets, "calls/trial", "items/call"], function_rows)
    buckets, thread_rows = threads.growth()
    print("the driver's threads: CPU ms per finished trial")
    common.print_table(["thread", *buckets], thread_rows)
    if profile:
        print("what grew: main-thread CPU ms per finished trial inside each function (its calls included)")
        common.print_table(["function", *profile.buckets()], profile.growth())
    rows = bucket_rows(samples, start, ends)
    # against the second bucket: the first holds Ray's start and the baselines' full runs
    second = rows[min(1, len(rows) - 1)]
    common.print_ratio("driver CPU per result, last bucket/second", rows[-1][2] / second[2])
    common.print_ratio("driver CPU per trial, last bucket/second", rows[-1][5] / second[5])


def common_size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


if __name__ == "__main__":
    main()
