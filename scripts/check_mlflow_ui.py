"""Follow the README's MLflow steps in a headless browser and screenshot what a user sees.

Not part of CI: it needs Chromium and Playwright, which are no project dependencies.

    apt-get install -y chromium                              # Debian's browser
    python3 -m venv /tmp/ui-venv && /tmp/ui-venv/bin/pip install playwright
    /tmp/ui-venv/bin/python scripts/check_mlflow_ui.py --backend-store-uri sqlite:///mlflow.db

It starts a real ``mlflow server`` (the project's, ``--mlflow``) on 127.0.0.1 over the store a
search wrote, then checks and screenshots into ``--out``:

0. ``0-experiment-default-view.png``: for the record, where MLflow opens the experiment without
   the link's ``workflowType`` (3.17.2: the GenAI overview, whatever ``mlflow.experimentKind``);
1. ``1-runs-table.png``: the README's link opens the runs table of the "Model training" view,
   and the Dataset column shows the training data;
2. ``2-nested-trials.png``: the search's parent run expanded shows its trials;
3. ``3-compare.png``: the compare view of the trials shows their params.

It talks to the server only through its REST API and the browser; it exits 1 naming the first
step that failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PageTimeout

REPO = Path(__file__).resolve().parent.parent
MODEL_TRAINING = "custom_model_development"  # cellseg.tracking.MODEL_TRAINING
TIMEOUT_MS = 60_000


class CheckFailed(Exception):
    pass


def runs_page(experiment_id: str) -> str:
    """The link the README gives (search/run.py prints it with the experiment's id)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, endpoint: str, body: dict | None = None) -> dict:
    """One MLflow REST call: GET with query parameters, or POST ``body`` when given."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(url)
    else:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(mlflow: str, uri: str, port: int, artifacts: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                mlflow,
                "server",
                "--backend-store-uri",
                uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--artifacts-destination",
                str(artifacts),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"mlflow server exited with {server.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise CheckFailed(f"mlflow server did not answer on port {port} within 120 s; see {log}")


def find_search(base: str, experiment: str, search: str | None) -> tuple[str, dict, list[dict]]:
    """The experiment id, the search's parent run (the latest when ``search`` is None), its trials."""
    found = api(base, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))[
        "experiment"
    ]
    tags = {t["key"]: t["value"] for t in found.get("tags", [])}
    if tags.get("mlflow.experimentKind") != MODEL_TRAINING:
        raise CheckFailed(
            f"experiment {experiment!r} has mlflow.experimentKind="
            f"{tags.get('mlflow.experimentKind')!r}, not {MODEL_TRAINING!r}"
        )
    runs = api(
        base,
        "runs/search",
        {
            "experiment_ids": [found["experiment_id"]],
            "max_results": 1000,
            "order_by": ["attributes.start_time DESC"],
        },
    ).get("runs", [])

    def tag(run: dict, key: str) -> str | None:
        return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)

    parents = [
        r for r in runs if tag(r, "cellseg.search_name") and search in (None, tag(r, "cellseg.search_name"))
    ]
    if not parents:
        raise CheckFailed(f"no search {search or ''} in experiment {experiment!r}")
    parent = parents[0]
    trials = [r for r in runs if tag(r, "mlflow.parentRunId") == parent["info"]["run_id"]]
    if len(trials) < 2:
        raise CheckFailed(
            f"search {parent['info']['run_name']!r} has {len(trials)} trial(s); the compare view needs two"
        )
    return found["experiment_id"], parent, trials


def expect_text(page: Page, text: str, step: str) -> None:
    try:
        page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=TIMEOUT_MS)
    except PageTimeout:
        raise CheckFailed(f"{step}: {text!r} not shown within {TIMEOUT_MS / 1000:.0f} s") from None


def check(
    page: Page, base: str, experiment_id: str, parent: dict, trials: list[dict], out: Path
) -> list[str]:
    notes = []
    parent_name = parent["info"]["run_name"]
    trial_names = [t["info"]["run_name"] for t in trials]

    # 0. for the record: the experiment opened without the link's view, in a fresh browser
    page.goto(f"{base}/#/experiments/{experiment_id}")
    try:  # MLflow redirects to the tab it picks
        page.wait_for_url(re.compile(rf"/experiments/{experiment_id}/\w+"), timeout=TIMEOUT_MS)
    except PageTimeout:
        notes.append("0 MLflow did not redirect the experiment to a tab")
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "0-experiment-default-view.png"))
    notes.append(f"0 without ?workflowType the experiment opens at {page.url}")

    # 1. the README's (and the search's) link: the runs table in MLflow's "Model training" view
    page.goto(f"{base}/{runs_page(experiment_id)}")
    expect_text(page, parent_name, "runs table")
    page.wait_for_timeout(2000)
    if "/runs" not in page.url:
        raise CheckFailed(f"runs table: the link opened {page.url}, not the runs table")
    dataset = parent["inputs"]["dataset_inputs"][0]["dataset"]["name"]
    expect_text(page, dataset, "runs table, Dataset column")
    page.screenshot(path=str(out / "1-runs-table.png"), full_page=True)
    notes.append(f"1 runs table at {page.url}; dataset {dataset!r} shown")

    # 2. expand the search's parent run: its trials appear nested under it
    row = page.get_by_role("row").filter(has_text=parent_name).first
    row.get_by_role("button").first.click()
    for name in trial_names[:2]:
        expect_text(page, name, "nested trials")
    page.screenshot(path=str(out / "2-nested-trials.png"), full_page=True)
    notes.append(f"2 parent {parent_name!r} expanded: {len(trial_names)} trials listed")

    # 3. compare the trials
    runs = json.dumps([t["info"]["run_id"] for t in trials])
    page.goto(
        f"{base}/#/compare-runs?runs={urllib.parse.quote(runs)}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
        "&workflowType=machine_learning"
    )
    expect_text(page, trial_names[0], "compare view")
    expect_text(page, "optim.lr", "compare view params")
    page.wait_for_timeout(3000)  # charts draw after the tables
    page.screenshot(path=str(out / "3-compare.png"), full_page=True)
    notes.append(f"3 compare view of {len(trials)} trials")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="cellseg")
    p.add_argument("--search", help="search name (default: the latest search of the experiment)")
    p.add_argument(
        "--mlflow",
        default=str(REPO / ".venv" / "bin" / "mlflow"),
        help="the mlflow executable of the project's environment",
    )
    p.add_argument("--browser", default=shutil.which("chromium") or "chromium", help="a Chromium executable")
    p.add_argument("--out", default="mlflow-ui-check", help="folder for the screenshots")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as artifacts:
        server = None
        try:
            server = start_server(
                args.mlflow, args.backend_store_uri, port, Path(artifacts), out / "mlflow-server.log"
            )
            experiment_id, parent, trials = find_search(base, args.experiment, args.search)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.browser, headless=True)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                try:
                    notes = check(page, base, experiment_id, parent, trials, out)
                except CheckFailed:
                    page.screenshot(path=str(out / "failed.png"), full_page=True)
                    raise
                finally:
                    browser.close()
        except CheckFailed as exc:
            print(f"check_mlflow_ui: FAILED: {exc} (screenshots in {out})", file=sys.stderr)
            return 1
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    print("\n".join(notes))
    print(f"check_mlflow_ui: OK, screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
