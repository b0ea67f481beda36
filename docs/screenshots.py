"""Takes the README's screenshots of a real run with the page tests' own code (``tests/browser.py`` and the
chat test's helpers): ``docs/report.png`` of ``<run_dir>/report.html`` and ``docs/chat.png`` of the chat
page serving ``<run_dir>/adapter``, asked one hold-out question picked by its category.

    .venv/bin/python docs/screenshots.py outputs
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from browser import headless_chromium, screenshot  # noqa: E402
from judge_servers import free_port  # noqa: E402
from test_chat_page import WAIT_S, _choose, _serve, _text_of, _wait_until_served  # noqa: E402


def main(run_dir: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium(1280, 1400) as browser:
        browser.get((run_dir / "report.html").resolve().as_uri())
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(
            "return Array.from(document.querySelectorAll('.plotly-graph-div')).every(d => d.querySelector('.main-svg'))"))
        print("wrote", screenshot(browser, REPO / "docs" / "report.png"))
    hold_out = [json.loads(line) for line in (run_dir / "hold_out_predictions.jsonl").read_text().splitlines()]
    example = next(row for row in hold_out if row["category"] == "Stoicism")
    port, log = free_port(), Path("/tmp/philo_chat_screenshot.log")
    server = _serve(str(run_dir / "adapter"), port, log)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(server, url, log)
        with headless_chromium(1280, 1100) as browser:
            browser.get(url)
            wait = WebDriverWait(browser, WAIT_S * 4)
            wait.until(lambda b: b.find_element("css selector", "#question textarea"))
            _choose(browser, "category", example["category"])
            _choose(browser, "example", example["question"])
            wait.until(lambda b: _text_of(b, "question") == example["question"])
            browser.find_element("css selector", "#ask").click()
            wait.until(lambda b: b.find_element("css selector", "#status").text.startswith("Done"))
            print("wrote", screenshot(browser, REPO / "docs" / "chat.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs"))
