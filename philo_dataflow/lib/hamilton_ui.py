"""The Hamilton UI: a run tracked by ``hamilton_sdk``'s ``HamiltonTracker`` (a Hamilton lifecycle adapter)
into a project of a Hamilton UI server (``apache-hamilton-ui``; ``hamilton ui`` starts one on SQLite, by
default at http://localhost:8241). The UI then shows each run's graph, every node's time, inputs and
result summary, and the metadata of what the data loaders read and the data savers wrote.

The server's own HTTP API is used for what the SDK leaves out: finding the project by name and creating
it when it is missing (``POST /api/v1/projects``, visible and writable by the user only). In the UI's
local ("mini") mode any user name is accepted and no API key is needed. Imports ``problems`` only;
``hamilton_sdk`` and ``requests`` are imported when a tracker is made.
"""

import importlib.util
from typing import Optional

from .problems import flag

#: The DAG name runs are filed under in a project.
DAG_NAME = "philo_dataflow"
#: Seconds each request to the UI server may take (the health probe and the project lookup).
REQUEST_TIMEOUT_SECONDS = 10.0
#: The package that provides ``HamiltonTracker``, and the extra that installs it.
SDK_PACKAGE, SDK_EXTRA = "apache-hamilton-sdk", "philo-dataflow[hamilton-ui]"


def _where(url: str) -> str:
    return f"hamilton_ui_url={url!r} ({flag('hamilton_ui_url')})"


def _headers(username: str) -> dict:
    return {"x-api-user": username, "x-api-key": ""}


def server_problems(url: str) -> list:
    """Why no Hamilton UI can track a run at ``url`` (the SDK is not installed; nothing answers
    ``GET <url>/api/v0/health``), as lines naming the input; empty when one can."""
    if importlib.util.find_spec("hamilton_sdk") is None:
        return [f"{_where(url)}: tracking in the Hamilton UI needs {SDK_PACKAGE}; pip install '{SDK_EXTRA}'."]
    import requests

    try:
        response = requests.get(f"{url.rstrip('/')}/api/v0/health", timeout=REQUEST_TIMEOUT_SECONDS)
    except requests.RequestException as error:
        reason = str(error).splitlines()[0][:160]
        return [f"{_where(url)}: no Hamilton UI answers there ({reason}); start one with `hamilton ui` or correct "
                "the URL."]
    if response.status_code != 200:
        return [f"{_where(url)}: GET /api/v0/health answered HTTP {response.status_code}; is this a Hamilton UI?"]
    return []


def project_id(url: str, project: str, username: str) -> int:
    """The id of the project named ``project`` that ``username`` can see on the UI server at ``url``,
    created (visible and writable by that user) when there is none.

    :raises ValueError: the server refuses a request (the message names the input and the HTTP status).
    """
    import requests

    api, headers = f"{url.rstrip('/')}/api/v1", _headers(username)

    def answer(response):
        if response.status_code != 200:
            raise ValueError(f"{_where(url)}: {response.request.method} {response.url} answered HTTP "
                             f"{response.status_code} ({response.text[:160]}); check the URL and "
                             f"hamilton_ui_user ({flag('hamilton_ui_user')}).")
        return response.json()

    listed = answer(requests.get(f"{api}/projects", headers=headers, timeout=REQUEST_TIMEOUT_SECONDS))
    found = [entry["id"] for entry in listed if entry.get("name") == project]
    if found:
        return min(found)
    user_id = answer(requests.get(f"{api}/whoami", headers=headers, timeout=REQUEST_TIMEOUT_SECONDS))["user"]["id"]
    body = {"name": project, "description": "philo_dataflow fine-tuning runs", "tags": {},
            "visibility": {"user_ids_visible": [], "team_ids_visible": [], "team_ids_writable": [],
                           "user_ids_writable": [user_id]}}
    return answer(requests.post(f"{api}/projects", json=body, headers=headers, timeout=REQUEST_TIMEOUT_SECONDS))["id"]


def run_tags(config: dict, inputs: dict) -> dict:
    """The tags a tracked run carries: ``start``, ``finetuning_method``, ``architecture``, ``judge``, the
    model (``model_id``, or the presaved adapter directory) and the data file, all as strings."""
    model = inputs.get("presaved_model_dir") if config.get("start") == "presaved" else inputs.get("model_id")
    tags = {"start": config.get("start"), "finetuning_method": config.get("finetuning_method"),
            "architecture": config.get("architecture"), "judge": config.get("judge"), "model": model,
            "data_path": inputs.get("data_path")}
    return {name: str(value) for name, value in tags.items() if value is not None}


def hamilton_ui_tracker(url: str, project: str, username: str, tags: Optional[dict] = None,
                        dag_name: str = DAG_NAME):
    """A ``hamilton_sdk.adapters.HamiltonTracker`` that files the driver's runs under ``dag_name`` in the
    project ``project`` (created when missing, ``project_id``) of the Hamilton UI at ``url``. Give it to
    ``build_driver(config, adapters=[...])``; ``philo-dataflow --hamilton-ui-url URL`` does.

    :param tags: string tags every run carries (``run_tags`` gives the run's model, data and switches).
    :raises ValueError: the SDK is missing or the server does not answer (``server_problems``' lines), or
        refuses a request.
    """
    problems = server_problems(url)
    if problems:
        raise ValueError("\n".join(problems))
    from hamilton_sdk.adapters import HamiltonTracker

    return HamiltonTracker(project_id=project_id(url, project, username), username=username, dag_name=dag_name,
                           tags=tags or {}, hamilton_api_url=url.rstrip("/"), hamilton_ui_url=url.rstrip("/"))
