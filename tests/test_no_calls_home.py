"""Nothing calls home: `cellseg train`, `cellseg export` and a search run with every proxy
variable pointing at a loopback server that records and refuses each request.

The children get the user's environment without cellseg's switches, without the CI markers that
make MLflow keep quiet on its own (``PYTEST_CURRENT_TEST`` among them), and with no ``no_proxy``,
so that whatever a library would send out reaches the recorder.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cellseg.data.synth import make_synthetic_dataset
from cellseg.telemetry_off import OFF, OPT_IN, telemetry_env
from searchutil import RUN_PY, search_args

REPO = Path(__file__).resolve().parents[1]
TRIALS = REPO / "trials"
TINY = ["--set", "model.min_size=64", "--set", "model.max_size=128"]
# Markers of CI or test runs under which MLflow stays silent by itself (mlflow/telemetry/utils.py)
QUIET_MARKERS = (
    "PYTEST_CURRENT_TEST",
    "CI",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "BUILDKITE",
    "JENKINS_URL",
    "TRAVIS",
    "CIRCLECI",
    "TF_BUILD",
    "DO_NOT_TRACK",
)
# Ray 2.60's dashboard probes three cloud-metadata addresses when a local Ray starts, before it
# reads RAY_USAGE_STATS_ENABLED (ray/dashboard/modules/usage_stats/usage_stats_head.py, run());
# no setting turns that off. A `ray up` head reads ~/ray_bootstrap_config.yaml instead.
RAY_DASHBOARD_PROBES = {
    "GET http://169.254.169.254/metadata/instance?api-version=2021-12-13",
    "GET http://metadata.google.internal/computeMetadata/v1",
    "GET http://169.254.169.254/latest/meta-data/",
}


class _Recorder(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(65536).decode("latin-1").strip()
        self.server.requests.append(line.rsplit(" ", 1)[0])  # "GET http://host/path", "CONNECT h:443"
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class RecordingProxy(socketserver.ThreadingTCPServer):
    """An HTTP(S) proxy on a loopback port that records each request line and refuses it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def take(self) -> list[str]:
        """The requests recorded since the last call."""
        taken, self.requests[:] = list(self.requests), []
        return taken


@pytest.fixture(scope="module")
def proxy() -> RecordingProxy:
    server = RecordingProxy()
    yield server
    server.shutdown()
    server.server_close()


def proxied_env(proxy: RecordingProxy, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OFF
        and k != OPT_IN
        and k not in QUIET_MARKERS
        and k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")
    }
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[key] = proxy.url
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("calls_home")
    data = make_synthetic_dataset(tmp / "data", 4, 2, seed=2, profile="easy")
    return {"tmp": tmp, "data": data, "uri": f"sqlite:///{tmp}/mlflow.db"}


def cellseg(*argv: str) -> list[str]:
    return ["-m", "cellseg.cli", *argv]


@pytest.mark.slow
def test_train_and_export_attempt_no_connection(proxy, workspace):
    tmp, env = workspace["tmp"], proxied_env(proxy, TORCH_HOME=str(workspace["tmp"] / "torch"))
    proxy.take()
    run(
        cellseg(
            "train",
            "--config",
            str(TRIALS / "demo.yaml"),
            "--data",
            str(workspace["data"]),
            *TINY,
            "--set",
            "train.epochs=1",
            "--set",
            f"train.output_dir={tmp / 'runs'}",
            "--tracking-uri",
            workspace["uri"],
            "--name",
            "t",
            "--no-progress",
        ),
        env,
        tmp,
    )
    assert proxy.take() == [], "cellseg train tried to connect"
    run(
        cellseg(
            "export",
            "--best",
            "--tracking-uri",
            workspace["uri"],
            "--data",
            str(workspace["data"]),
            "--output",
            str(tmp / "test-results.json"),
            "--no-progress",
        ),
        env,
        tmp,
    )
    assert (tmp / "test-results.json").is_file()
    assert proxy.take() == [], "cellseg export tried to connect"


@pytest.mark.slow
def test_search_attempts_no_connection_but_rays_metadata_probes(proxy, workspace, tiny_search):
    tmp = workspace["tmp"]
    proxy.take()
    run(
        [
            str(RUN_PY),
            *search_args(
                workspace["data"],
                tiny_search,
                tmp / "storage",
                workspace["uri"],
                "search",
                "s",
                "--num-samples",
                "1",
                "--max-epochs",
                "1",
            ),
        ],
        proxied_env(proxy),
        tmp,
    )
    assert set(proxy.take()) <= RAY_DASHBOARD_PROBES


def test_user_settings_win_and_opting_in_sets_nothing():
    assert telemetry_env({}) == OFF
    assert telemetry_env({"RAY_USAGE_STATS_ENABLED": "1"})["RAY_USAGE_STATS_ENABLED"] == "1"
    assert telemetry_env({OPT_IN: "on", "MLFLOW_DISABLE_TELEMETRY": "true"}) == {}


def test_cluster_nodes_start_ray_and_mlflow_with_telemetry_off():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [
        c
        for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
        if "ray start" in c or "mlflow server" in c
    ]
    assert len(starts) == 3
    for command in starts:
        for key, value in OFF.items():
            assert f"{key}={value} " in command, command


@pytest.mark.slow
def test_imagenet_weights_absent_from_the_cache_are_the_only_attempt(proxy, workspace):
    tmp = workspace["tmp"]
    proxy.take()
    done = subprocess.run(
        [
            sys.executable,
            *cellseg(
                "train",
                "--config",
                str(TRIALS / "demo.yaml"),
                "--data",
                str(workspace["data"]),
                *TINY,
                "--set",
                "model.weights=imagenet",
                "--set",
                "model.norm=frozen_bn",
                "--tracking-uri",
                workspace["uri"],
                "--name",
                "w",
                "--no-progress",
            ),
        ],
        env=proxied_env(proxy, TORCH_HOME=str(tmp / "empty-torch-home")),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and "downloading https://download.pytorch.org/" in done.stderr
    assert proxy.take() == ["CONNECT download.pytorch.org:443"]
