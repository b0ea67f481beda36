"""Tracking in the Hamilton UI, against the real UI server started on loopback (``tests/hamilton_ui_server.py``):
a tiny run tracked through ``philo-dataflow --hamilton-ui-url`` is read back through the UI's own HTTP API
(its run and tags, every node with its times, the data loader's and the data savers' metadata), and its
page is opened in headless Chromium (``PHILO_DOCS_SCREENSHOTS=1`` saves ``docs/hamilton_ui_run.png``)."""

import hashlib
import json
import time
from pathlib import Path

import pytest
import requests
from browser import docs_screenshot, headless_chromium, screenshot
from conftest import FAST_INPUTS, cli_flags, example_subset
from hamilton_ui_server import hamilton_ui_server

from philo_dataflow import cli
from philo_dataflow.lib.hamilton_ui import project_id

PROJECT, USER = "philo tests", "tester"
#: Seconds the tracker's thread may take to send every node's results (it flushes every 5 s).
SEND_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> str:
    with hamilton_ui_server(tmp_path_factory.mktemp("hamilton-ui")) as url:
        yield url


def _api(url: str, path: str, **params):
    response = requests.get(f"{url}/api/v1/{path}", params=params, timeout=10,
                            headers={"x-api-user": USER, "x-api-key": ""})
    assert response.status_code == 200, response.text[:300]
    return response.json()


@pytest.fixture(scope="module")
def tracked_run(ui, tiny_model_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tracked")
    data = example_subset(work / "data.jsonl", 5, ("Stoicism", "Taoism", "Hedonism"))
    out = work / "out"
    argv = ["--model-id", tiny_model_dir, "--data-path", data, "--output-dir", str(out), "--no-graph", "--no-cache",
            "--hamilton-ui-url", ui, "--hamilton-ui-project", PROJECT, "--hamilton-ui-user", USER,
            *cli_flags(FAST_INPUTS)]
    assert cli.main(argv) == 0
    projects = [entry for entry in _api(ui, "projects") if entry["name"] == PROJECT]
    assert len(projects) == 1
    runs = _api(ui, "dag_runs/latest/", project_id=projects[0]["id"])
    assert len(runs) == 1
    # The tracker sends node results from a thread every few seconds (and the rest when the process exits):
    # wait until the last saver's result is in.
    run_id, deadline = runs[0]["id"], time.time() + SEND_TIMEOUT_SECONDS
    while _api(ui, f"node_runs/by_run_ids/{run_id}", node_name="saved_run_config") == [None]:
        assert time.time() < deadline, f"saved_run_config's result not sent within {SEND_TIMEOUT_SECONDS} s"
        time.sleep(1)
    nodes = {node["node_name"]: node for node in _api(ui, f"dag_runs/{run_id}")[0]["node_runs"]}
    return {"data": Path(data), "out": out, "model": tiny_model_dir, "project_id": projects[0]["id"], "run": runs[0],
            "nodes": nodes, "url": ui}


def _summary(tracked_run: dict, node: str) -> dict:
    """The node's result as the UI holds it (the tracker's ``result_summary`` attribute)."""
    (node_run,) = _api(tracked_run["url"], f"node_runs/by_run_ids/{tracked_run['run']['id']}", node_name=node)
    (attribute,) = [a for a in node_run["attributes"] if a["name"] == "result_summary"]
    return attribute["value"]["value"]


def test_the_run_its_tags_and_every_node_with_its_times(tracked_run):
    run, nodes = tracked_run["run"], tracked_run["nodes"]
    assert run["run_status"] == "SUCCESS"
    assert run["tags"] == {"start": "base", "finetuning_method": "lora", "architecture": "causal", "judge": "False",
                           "model": tracked_run["model"], "data_path": str(tracked_run["data"])}
    assert {"raw_records.loader", "instruction_records", "trained_parameters", "hold_out_set_predictions",
            "run_metrics", "save_best_models", "saved_metrics", "saved_report_html"} <= set(nodes)
    assert all(node["status"] == "SUCCESS" for node in nodes.values())
    assert all(node["end_time"] >= node["start_time"] for node in nodes.values())
    assert nodes["trained_parameters"]["end_time"] > nodes["trained_parameters"]["start_time"]


def test_what_the_run_read_and_wrote(tracked_run):
    data, out = tracked_run["data"], tracked_run["out"]
    loaded = _summary(tracked_run, "raw_records.loader")
    assert (loaded["data_path"], loaded["format"], loaded["records"]) == (str(data), "jsonl", 15)
    assert loaded["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    manifest = json.loads((out / "adapter" / "philo_dataflow_manifest.json").read_text())
    assert manifest["data_sha256"] == loaded["sha256"]
    for node, name in (("saved_metrics", "metrics.json"), ("saved_report", "report.md"),
                       ("saved_report_html", "report.html"), ("saved_run_config", "config.yaml")):
        saved = _summary(tracked_run, node)
        assert (saved["path"], saved["bytes"]) == (str(out / name), (out / name).stat().st_size), node
        assert saved["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    adapter = _summary(tracked_run, "save_best_models")
    assert adapter["file_bytes"]["adapter_model.safetensors"] == (out / "adapter/adapter_model.safetensors").stat().st_size


def test_the_project_is_found_again_not_made_twice(tracked_run, ui):
    assert project_id(ui, PROJECT, USER) == tracked_run["project_id"]
    assert [entry["name"] for entry in _api(ui, "projects")].count(PROJECT) == 1


def test_the_runs_page_in_chromium(tracked_run, ui, tmp_path):
    """The UI's own page of the run, after its local-mode sign-in (a user name). The page asks Google
    Analytics for a script: every host but loopback resolves to nothing, so no request leaves the machine."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = f"{ui}/dashboard/project/{tracked_run['project_id']}/runs/{tracked_run['run']['id']}"
    loopback_only = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)
    with headless_chromium(1440, 1000, loopback_only) as browser:
        browser.get(page)
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[placeholder=Username]"))
        browser.find_element(By.CSS_SELECTOR, "input[placeholder=Username]").send_keys(USER)
        browser.find_element(By.XPATH, "//*[contains(text(), 'Get started')]").click()
        WebDriverWait(browser, 30).until(lambda b: not b.find_elements(By.CSS_SELECTOR, "input[placeholder=Username]"))
        browser.get(page)
        WebDriverWait(browser, 60).until(lambda b: "trained_parameters" in b.page_source)
        time.sleep(2)  # the graph's layout settles
        screenshot(browser, tmp_path / "run.png")
        docs_screenshot(browser, "hamilton_ui_run.png")


def test_an_unreachable_ui_is_one_error_line_and_nothing_written(tmp_path, capsys, tiny_model_dir):
    from judge_servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--model-id", tiny_model_dir, "--output-dir", str(tmp_path / "out"), "--no-graph", "--hamilton-ui-url", url]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: hamilton_ui_url='{url}' (--hamilton-ui-url): no Hamilton UI")
    assert not (tmp_path / "out").exists()
