"""The MLflow writer process: the search driver's MLflow writes, applied outside Tune's loop.

MLflow's store spends tens of milliseconds per write (docs/performance.md, driver scale), which
the driver would otherwise spend between Tune's events. The driver's Tune callback
(search/mlflow_callback.py) decides each write and hands it to :class:`MlflowWriter`, which
appends it to a journal file and sends it to a child process (``python -m search.mlflow_writer``)
that applies the writes in order (search/trial_runs.py) through an outbox that retries them while
the store is down (search/mlflow_outbox.py).

Nothing is lost when a process dies:

- The journal is a folder (``<storage>/<name>/mlflow-writes/``): each driver's writes go to a
  segment file (``<time>.jsonl``, one JSON line per write, appended before the write is sent),
  and the writer appends the number of each write it has applied to ``<segment>.applied``. A
  writer deletes a segment once every write in it is applied.
- A writer starts by taking the folder's lock (``writer.lock``, released when its process ends),
  then applies what earlier segments hold past their last applied write: the writes of a driver
  killed with its writer (a lost machine), or of a search whose store stayed down to its end.
  Before its first write it reads the runs the search already has (a resumed search's), retried
  like a write while the store is down.
- The writer ignores Ctrl-C. A driver that finishes waits for its writer to apply everything
  (up to ``--mlflow-wait`` while the store is down) and tells it to exit. When the driver's end
  of its input closes first (the driver died), the writer applies what it was sent and what the
  driver journaled but did not send, once, if the store answers, and exits; a resumed search's
  writer waits for the lock until then.

The writer tells the driver, through a pipe, each close after which Tune's copy of a checkpoint
is no longer needed (search/checkpoint_cleanup.py), and answers the driver's waits.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cellseg.errors import TrackingError
from search.driver_drill import drill_for
from search.mlflow_outbox import Outbox
from search.trial_runs import RunsSpec, TrialRuns

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SEGMENT = ".jsonl"  # a driver's writes, one JSON line each: [operation, arguments]
APPLIED = ".applied"  # beside a segment: the numbers of its writes applied, one per line
LOCK = "writer.lock"
JOURNAL = "mlflow-writes"  # the journal folder, beside a search's Optuna study
OLD_OUTBOX = "mlflow-outbox.json"  # where drivers before the writer process queued writes
PIPE_BYTES = 1 << 20  # the input pipe's size where Linux allows it: writes queue without blocking
NOTE_S = 60.0  # how often a driver waiting for its writer says so
EXIT_WAIT_S = 30.0  # how long a driver waits for its writer to exit once told to


def segments(folder: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(folder.glob(f"*{SEGMENT}"))


def applied_count(segment: Path) -> int:
    """How many of ``segment``'s writes were applied (the last number in its ``.applied``)."""
    marks = segment.with_suffix(APPLIED)
    numbers = marks.read_text().split() if marks.is_file() else []
    return int(numbers[-1]) if numbers else 0


def adopt_outbox(local_dir: Path, folder: Path) -> None:
    """Move the writes an older version's driver queued in ``mlflow-outbox.json`` (a JSON list)
    into the journal, as its first segment."""
    outbox = local_dir / OLD_OUTBOX
    if not outbox.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(write) + "\n" for write in json.loads(outbox.read_text()))
    (folder / f"0{SEGMENT}").write_text(lines)
    outbox.unlink()


def remove_segment(segment: Path) -> None:
    segment.unlink(missing_ok=True)  # first: a segment never lies without its marks
    segment.with_suffix(APPLIED).unlink(missing_ok=True)


class MlflowWriter:
    """The driver's side: journals each write and sends it to the writer process."""

    _open: dict[Path, MlflowWriter] = {}  # the driver's writer per journal folder

    def __init__(self, spec: RunsSpec, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        earlier = self._open.pop(folder, None)
        if earlier is not None and not earlier.closed:  # an experiment that ended on an error:
            earlier.abandon()  # its writer finishes what it was sent and frees the lock
        self.folder = folder
        self.segment = folder / f"{time.time_ns()}{SEGMENT}"
        self.sent = 0  # writes sent, numbered from 1
        self.closed = False
        self._partial = b""
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        # Ctrl-C is the driver's: blocked in the writer from its start (main() then ignores it)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "search.mlflow_writer", str(folder), self.segment.name, str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(write_fd)
        try:
            fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the system's limit is lower: writes wait for the writer sooner
        self._answers = os.fdopen(read_fd, "rb", buffering=0)
        os.set_blocking(read_fd, False)
        self._journal = self.segment.open("ab")
        self._open[folder] = self
        self._send({"spec": asdict(spec), "driver": os.getpid()})

    def put(self, op: str, /, **kwargs: Any) -> int:
        """Journal one write and send it; its number."""
        line = (json.dumps([op, kwargs]) + "\n").encode()
        self._journal.write(line)
        self._journal.flush()  # in the kernel: kept when the driver's process dies
        self._send(line)
        self.sent += 1
        return self.sent

    def answers(self) -> list[list[Any]]:
        """The writer's messages so far, without waiting: ``["freed", number, trial_id, uri]``
        (write ``number`` closed the trial's run; Tune's checkpoint ``uri`` is no longer needed)
        and ``["waited", pending]``. TrackingError when the writer stopped."""
        chunk = self._answers.read()  # None: nothing yet (a non-blocking pipe)
        if chunk:
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        if not chunk and not self.closed:
            self._check_alive()
        return [json.loads(line) for line in lines]

    def wait(self, timeout_s: float, *, end: bool = False) -> tuple[bool, list[list[Any]]]:
        """Wait until the writer has applied every write sent, retrying while the store is down
        for up to ``timeout_s`` (``end``: then it exits); whether it has, and the other messages
        that came meanwhile. The writer first takes the journal's lock and applies what earlier
        drivers left, so this waits as long as the writer lives, saying so every minute."""
        self._send({"wait": timeout_s, "end": end})
        got: list[list[Any]] = []
        started = time.monotonic()
        next_note = started + NOTE_S
        while True:
            select.select([self._answers], [], [], 1.0)
            got += self.answers()
            for i, answer in enumerate(got):
                if answer[0] == "waited":
                    return answer[1] == 0, got[:i] + got[i + 1 :]
            if time.monotonic() >= next_note:
                next_note += NOTE_S
                log.warning(
                    "waiting %.0f s for the MLflow writer process (journal %s)",
                    time.monotonic() - started,
                    self.folder,
                )

    def close(self, timeout_s: float) -> tuple[bool, list[list[Any]]]:
        """:meth:`wait`, and the writer exits; whether every write was applied (else they are
        kept in the journal for the search's next driver), and the writer's last messages."""
        done, got = self.wait(timeout_s, end=True)
        self.closed = True
        self.process.stdin.close()
        self._journal.close()
        try:
            self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the MLflow writer process did not exit; stopped (its writes are in %s)", self.folder)
            self.process.kill()
            self.process.wait()
        got += [a for a in self.answers() if a[0] != "waited"]
        self._answers.close()
        return done, got

    def abandon(self) -> None:
        """Close the writer's input without waiting: it applies what it was sent and exits."""
        self.closed = True
        self.process.stdin.close()
        self._journal.close()
        self._answers.close()

    def _send(self, message: dict[str, Any] | bytes) -> None:
        line = message if isinstance(message, bytes) else (json.dumps(message) + "\n").encode()
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except BrokenPipeError:
            try:
                self.process.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            self._check_alive()
            raise TrackingError(
                f"the MLflow writer process closed its input; its writes are in {self.folder}"
            ) from None

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise TrackingError(
                f"the MLflow writer process stopped (exit code {code}; its error is in the log above). "
                f"Its writes are kept in {self.folder}: once what that error names is fixed (a store "
                "that refuses the search's runs, e.g. a permission or a deleted experiment), rerun the "
                "search with --resume, which applies them"
            )


class JournalWriter:
    """The writer process's side: applies the journal's leftovers, then the driver's writes."""

    def __init__(self, runs: TrialRuns, folder: Path, segment: Path, answers: int) -> None:
        self.runs = runs
        self.folder = folder
        self.segment = segment
        self._answers = answers
        self.outbox = Outbox(self._apply, prepare=runs.load)  # the runs the search has, first
        self.received = 0  # the driver's writes received, numbered from 1
        self.leftovers: list[Path] = []

    def replay(self) -> None:
        """Queue the writes earlier segments hold past their last applied one."""
        for segment in segments(self.folder):
            if segment == self.segment:
                continue
            done = applied_count(segment)
            left = self._queue_from(segment, done)
            if left:
                log.warning("applying %d MLflow writes left over in %s", left, segment)
            self.leftovers.append(segment)
        self._tidy()

    def serve(self, fd: int) -> None:
        """Apply the writes that come on ``fd`` until the driver says it is done; when ``fd``
        closes first (the driver is gone), also those it journaled but did not send, once, if the
        store answers."""
        for message in self._messages(fd):
            if isinstance(message, dict):
                self.outbox.drain(message["wait"])
                self._answer(["waited", len(self.outbox.pending)])
                if message["end"]:
                    return
            else:
                self.received += 1
                op, kwargs = message
                self.outbox.put(op, at=[self.segment.name, self.received], **kwargs)
            self._tidy()
        self._queue_from(self.segment, self.received)
        self.outbox.flush(force=True)
        self._tidy()

    def _queue_from(self, segment: Path, done: int) -> int:
        """Queue the writes of ``segment`` after its first ``done``; how many."""
        lines = segment.read_bytes().splitlines()[done:]
        for number, line in enumerate(lines, done + 1):
            try:
                op, kwargs = json.loads(line)
            except ValueError:  # cut mid-line: the driver died writing it, and never sent it
                return number - done - 1
            self.outbox.put(op, at=[segment.name, number], **kwargs)
        return len(lines)

    def _messages(self, fd: int) -> Iterator[Any]:
        partial = b""
        while True:
            timeout = self.outbox.retry_in() if self.outbox.pending else None
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self.outbox.flush()
                self._tidy()
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                yield json.loads(line)

    def _apply(self, op: str, /, at: list[Any], **kwargs: Any) -> None:
        freed = self.runs.apply(op, **kwargs)
        segment, number = at
        with (self.folder / segment).with_suffix(APPLIED).open("a") as marks:
            marks.write(f"{number}\n")
        if freed is not None:  # an earlier driver's write: number 0, before any of this driver's
            self._answer(["freed", number if segment == self.segment.name else 0, kwargs["trial_id"], freed])

    def _tidy(self) -> None:
        """With nothing queued, remove the leftovers (all applied or refused)."""
        if self.outbox.pending:
            return
        for segment in self.leftovers:
            remove_segment(segment)
        self.leftovers.clear()

    def finish(self) -> None:
        """Remove this driver's segment when everything in it went."""
        if not self.outbox.pending:
            remove_segment(self.segment)

    def _answer(self, message: list[Any]) -> None:
        if self._answers < 0:
            return
        try:
            os.write(self._answers, (json.dumps(message) + "\n").encode())
        except OSError:  # the driver is gone: nobody to answer, the writes still go
            self._answers = -1


def main(argv: list[str]) -> None:
    """``python -m search.mlflow_writer <journal folder> <segment> <answer fd>``, started by
    :class:`MlflowWriter`, which sends the spec first."""
    folder, segment_name, answers = Path(argv[0]), argv[1], int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by MlflowWriter until now
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mlflow-writer %(levelname)s %(message)s")
    fd = sys.stdin.fileno()
    first = b""
    while not first.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            return
        first += chunk
    hello = json.loads(first)
    spec = RunsSpec(**hello["spec"])
    with (folder / LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an earlier driver's writer may still be finishing
        runs = TrialRuns(spec)
        drill = drill_for(spec.search_name)
        if drill is not None:
            drill.pid = hello["driver"]
        runs.drill = drill
        writer = JournalWriter(runs, folder, folder / segment_name, answers)
        writer.replay()
        writer.serve(fd)
        writer.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
