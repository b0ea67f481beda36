"""A real Hamilton UI server (``apache-hamilton-ui``, its local "mini" mode on SQLite) on loopback, for the
tracking tests. ``hamilton ui`` serves on every interface (``0.0.0.0``); this starts the very same Django
project the same way (migrate, then ``runserver --insecure`` with ``server.settings_mini``) on
``127.0.0.1`` only, with its database and blobs in a temporary directory. Nothing is downloaded: the UI's
built pages ship in the wheel."""

import importlib.util
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from judge_servers import free_port, stop_process

#: Seconds the server has to migrate its database and answer its health check.
START_TIMEOUT_SECONDS = 120

_LAUNCHER = """
import os, sys
import hamilton_ui
from django.core.management import execute_from_command_line
port, base = sys.argv[1], sys.argv[2]
for part in ("blobs", "db"):
    os.makedirs(os.path.join(base, part), exist_ok=True)
os.environ["HAMILTON_BASE_DIR"] = base
sys.path.insert(0, hamilton_ui.__path__[0])
settings = "--settings=server.settings_mini"
execute_from_command_line(["manage.py", "migrate", settings, "--verbosity", "0"])
execute_from_command_line(["manage.py", "runserver", settings, f"127.0.0.1:{port}", "--insecure", "--noreload"])
"""


@contextmanager
def hamilton_ui_server(base_dir: Path):
    """Starts the UI on a free loopback port with ``base_dir`` as its home; yields its URL; stops it.

    Skips when ``apache-hamilton-ui`` is missing, except under ``CI=true`` (the README's test set-up
    installs it), where it fails."""
    if importlib.util.find_spec("hamilton_ui") is None:
        message = "apache-hamilton-ui missing: run `bash setup.sh --dev`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (base_dir / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(port), str(base_dir)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + START_TIMEOUT_SECONDS
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the Hamilton UI exited ({server.returncode}): "
                                   f"{(base_dir / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/api/v0/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the Hamilton UI did not answer within {START_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(server)
        log.close()
