"""The web UI at ``/`` in a real browser: Debian's headless Chromium driven by Selenium (``make test`` installs
``chromium`` and ``chromium-driver``), on a real cluster (mosquitto, a controller with the API and a key, 3
agents, then a fourth).

The page asks for the API key once and keeps it; a message's answer streams into the page; the cluster view
lists the 3 agents with their layer windows, and shows the re-plan when a fourth agent joins. Screenshots are
kept in the test's temporary folder (``webui-chat.png``, ``webui-4-agents.png``; the path is printed, see
``pytest -s`` or the test's captured output).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from homering.client.local import LocalCluster, stop_processes
from homering.transport.broker import free_port
from tests.conftest import wait_healthy

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "sk-webui-test-0123456789"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture(scope="module")
def cluster(smollm2, mosquitto, tmp_path_factory):
    """3 agents and a controller with the API (key ``KEY``) on a free port; yields ``(cluster, base URL)``."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "webui.log"
    with (
        open(log_path, "w") as log,
        LocalCluster(
            smollm2,
            n_agents=3,
            broker=mosquitto,
            threads=1,
            n_ctx=512,
            planner="proportional",
            controller_args=("--api-port", str(port)),
            controller_env={"HOMERING_API_KEY": KEY},
            log_file=log,
        ) as c,
    ):
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, c.procs, log_path=log_path)
        c.log_path = log_path
        yield c, base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's, as root: no sandbox) through Debian's chromedriver, a fresh profile."""
    binary = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium and chromium-driver are not installed: run 'make test' (it installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


def wait(browser, condition, timeout=120, message=""):
    """Poll ``condition(browser)`` until it is truthy (a stale element counts as not yet)."""

    def safe(b):
        try:
            return condition(b)
        except StaleElementReferenceException:
            return False

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(safe, message)


def agent_rows(browser, in_plan: bool = False) -> dict[str, list[str]]:
    """The cluster view's devices (``in_plan``: only those in the plan, not the idle ones) and the layer windows
    it shows for each (``"0–10"``). The suite's broker is shared: agents of earlier tests' clusters that were
    killed stay listed, idle (``/v1/cluster`` lists every agent the controller has heard of)."""
    rows = browser.find_elements(By.CSS_SELECTOR, "#agents tbody tr[data-agent]" + (":not(.idle)" if in_plan else ""))
    return {r.get_attribute("data-agent"): [w.text for w in r.find_elements(By.CSS_SELECTOR, ".window")] for r in rows}


def covers_all_layers(rows: dict[str, list[str]], n_layers: int = 30) -> bool:
    spans = sorted(tuple(int(x) for x in re.split(r"[–-]", w.split()[0])) for ws in rows.values() for w in ws)
    return (
        bool(spans)
        and spans[0][0] == 0
        and spans[-1][1] == n_layers
        and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    )


def test_page_asks_for_the_key_once_and_lists_three_agents_with_their_windows(cluster, browser):
    _, base = cluster
    browser.get(base + "/")
    dialog = wait(
        browser, lambda b: b.find_element(By.ID, "key-dialog").is_displayed() and b.find_element(By.ID, "key")
    )
    dialog.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(
        browser,
        lambda b: len(agent_rows(b, in_plan=True)) == 3 and all(agent_rows(b, in_plan=True).values()),
        message="3 agents with windows",
    )
    rows = agent_rows(browser, in_plan=True)
    assert covers_all_layers(rows), rows
    assert browser.find_element(By.ID, "plan-id").text
    assert browser.find_element(By.ID, "predicted").text not in ("", "–")
    assert browser.execute_script("return localStorage.getItem('homering.apiKey')") == KEY
    browser.refresh()  # the key is kept: no question the second time
    wait(browser, lambda b: len(agent_rows(b, in_plan=True)) == 3, message="the cluster view after a reload")
    assert not browser.find_element(By.ID, "key-dialog").is_displayed()


def test_markdown_is_rendered_and_html_escaped(cluster, browser):
    html = browser.execute_script(
        "return renderMarkdown('# Title\\n**bold** and `x < y`\\n\\n- one\\n- two\\n\\n<script>alert(1)</script>')"
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x &lt; y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<script>" not in html


def test_a_message_streams_into_the_page_and_stop_ends_it(cluster, browser, tmp_path):
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("temperature", "0"), ("max_tokens", "48")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys("Write a short poem about the sea.")
    browser.find_element(By.ID, "send").click()
    seen: list[str] = []

    def streaming_text(b):
        bubble = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        if "streaming" not in bubble.get_attribute("class"):
            return True
        text = bubble.text
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return False

    wait(browser, streaming_text, message="the answer to end")
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    assert len(seen) >= 3, f"the answer did not stream in parts: {seen}"
    assert answer.startswith(seen[0].split()[0]) and len(answer) > len(seen[0])
    shot = tmp_path / "webui-chat.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    # a longer answer, stopped in the middle
    browser.find_element(By.ID, "prompt").send_keys("Tell me a long story about a lighthouse keeper.")
    browser.find_element(By.ID, "send").click()
    wait(
        browser,
        lambda b: (
            b.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming")
            and b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        ),
    )
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda b: "(stopped)" in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
    assert browser.find_element(By.ID, "send").is_enabled()


def test_a_fourth_agent_joining_shows_as_a_replan(cluster, browser, tmp_path):
    c, _ = cluster
    first_plan = wait(browser, lambda b: b.find_element(By.ID, "plan-id").text, message="the plan id")  # re-rendered
    extra = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "homering",
            "agent",
            "--broker",
            str(c.broker),
            "--name",
            "late-agent",
            "--threads",
            "1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=c.log_file,
        stderr=c.log_file,
    )
    try:
        wait(browser, lambda b: "late-agent" in agent_rows(b), message="the fourth agent in the view")
        wait(
            browser,
            lambda b: (
                len(agent_rows(b, in_plan=True)) == 4
                and all(agent_rows(b, in_plan=True).values())
                and b.find_element(By.ID, "plan-id").text != first_plan
            ),
            timeout=180,
            message="a plan over 4 agents",
        )
        rows = agent_rows(browser, in_plan=True)
        assert covers_all_layers(rows), rows
        replans = wait(browser, lambda b: b.find_element(By.ID, "replans").text, message="the re-plans")
        assert "re-planned" in replans and "4 devices" in replans
        shot = tmp_path / "webui-4-agents.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        stop_processes([extra], 30)
    wait(browser, lambda b: "late-agent" not in b.find_element(By.ID, "plan").text, timeout=180, message="back to 3")
