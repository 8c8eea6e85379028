"""The chat page (GET /) in headless Chromium against a real server with the embedded model:
the model name, streamed multi-turn answers with a tokens/s readout, Stop (the server is left
with nothing running), and errors shown inline as text.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` package; the
module is skipped without them.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from taskloom import LLM
from taskloom.engine.client import AsyncEngineClient
from taskloom.server.launch import ServerThread, free_port, uvicorn_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the chat-page test needs headless Chromium: apt-get install chromium "
                "chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the chat-page test needs selenium")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MODEL = "smol"
TIMEOUT = 120           # seconds for a streamed answer on a slow CPU
RATE = re.compile(r"\d+(\.\d+)? tok/s")

# Wraps fetch so the test can read the JSON bodies the page sent to /v1/chat/completions.
RECORD_REQUESTS = """
window.__sent = [];
const original = window.fetch;
window.fetch = (url, init) => {
  if (String(url).endsWith('/v1/chat/completions')) window.__sent.push(JSON.parse(init.body));
  return original(url, init);
};
"""


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ServerThread]:
    llm = LLM(max_num_seqs=16, kv_cache_memory_gb=0.25)
    config = uvicorn_config(AsyncEngineClient(llm.engine), MODEL, "127.0.0.1", free_port(), None, None,
                            shutdown_grace=5, log_level="warning")
    st = ServerThread(config).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, chat_server: ServerThread) -> WebDriver:
    """A freshly loaded chat page, its model name shown, greedy sampling set in its inputs."""
    browser.get(chat_server.base_url + "/")
    wait(browser, 30).until(lambda d: d.find_element(By.ID, "model-name").text == MODEL)
    browser.find_element(By.CSS_SELECTOR, "#settings > summary").click()
    set_input(browser, "temperature", "0")
    set_input(browser, "max-tokens", "24")
    browser.execute_script(RECORD_REQUESTS)
    return browser


def wait(driver: WebDriver, timeout: float = TIMEOUT) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,))


def set_input(driver: WebDriver, element_id: str, value: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def messages(driver: WebDriver) -> list[tuple[str, str]]:
    """(kind, text) of every message shown, kind being user, assistant or error."""
    shown = driver.execute_script("""
        return Array.from(document.querySelectorAll('#messages .message')).map(m => [
          ['user', 'assistant', 'error'].find(k => m.classList.contains(k)), m.textContent]);
    """)
    return [(kind, text) for kind, text in shown]


def idle(driver: WebDriver) -> bool:
    send = driver.find_element(By.ID, "send")
    return (send.is_displayed() and send.is_enabled()
            and not driver.find_element(By.ID, "stop").is_displayed())


def ask(driver: WebDriver, text: str, press_enter: bool = True,
        timeout: float = TIMEOUT) -> None:
    """Type `text` and send it, then wait for the streamed answer and the tokens/s readout."""
    n = len(messages(driver))
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    if press_enter:
        prompt.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()
    wait(driver, timeout).until(lambda d: idle(d) and len(messages(d)) >= n + 2
                                and RATE.search(d.find_element(By.ID, "stats").text))


def sent_requests(driver: WebDriver) -> list[dict[str, Any]]:
    return driver.execute_script("return window.__sent;")


def metrics(server: ServerThread) -> dict[str, float]:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines()
             if line and not line.startswith("#"))}


def test_page_is_self_contained(chat_server: ServerThread) -> None:
    with urllib.request.urlopen(chat_server.base_url + "/", timeout=10) as r:
        html = r.read().decode()
    assert r.headers.get_content_type() == "text/html"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html


def test_streams_a_multi_turn_conversation(page: WebDriver) -> None:
    ask(page, "What is the capital of France?", press_enter=True)
    shown = messages(page)
    assert [k for k, _ in shown] == ["user", "assistant"]
    assert shown[0][1] == "What is the capital of France?"
    first_answer = shown[1][1]
    assert first_answer.strip()
    stats = page.find_element(By.ID, "stats").text
    assert "TTFT" in stats and re.search(r"\b\d+ tokens?\b", stats)

    ask(page, "And of Italy?", press_enter=False)
    shown = messages(page)
    assert [k for k, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[3][1].strip()

    first, second = sent_requests(page)
    for body in (first, second):
        assert body["model"] == MODEL and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["temperature"] == 0 and body["max_tokens"] == 24
    assert second["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And of Italy?"}]

    page.find_element(By.ID, "new-chat").click()
    assert messages(page) == []


def test_stop_keeps_the_partial_answer_and_frees_the_server(page: WebDriver,
                                                            chat_server: ServerThread) -> None:
    set_input(page, "max-tokens", "1500")
    page.find_element(By.ID, "prompt").send_keys("Write a very long story about a lighthouse.")
    page.find_element(By.ID, "send").click()
    wait(page).until(lambda d: len(messages(d)) == 2 and len(messages(d)[1][1]) >= 3)
    page.find_element(By.ID, "stop").click()
    wait(page, 10).until(idle)
    partial = messages(page)[1]
    assert partial[0] == "assistant" and partial[1].strip()
    assert page.find_element(By.CSS_SELECTOR, ".message.assistant").get_attribute(
        "data-note") == "stopped"

    deadline = time.monotonic() + 30
    while True:
        m = metrics(chat_server)
        if (m["taskloom_num_requests_running"] == 0.0
                and m["taskloom_kv_cache_usage_perc"] == 0.0):
            break
        assert time.monotonic() < deadline, f"the server is still busy after Stop: {m}"
        time.sleep(0.1)

    # The partial answer is part of the history the next turn sends.
    set_input(page, "max-tokens", "4")
    ask(page, "Thanks.")
    assert sent_requests(page)[-1]["messages"][1] == {"role": "assistant",
                                                     "content": partial[1]}


def test_errors_are_shown_inline_as_text(page: WebDriver) -> None:
    set_input(page, "max-tokens", "1000000")
    text = '<img src=x onerror="window.__injected=1"> hello'
    page.find_element(By.ID, "prompt").send_keys(text + Keys.ENTER)
    wait(page, 30).until(lambda d: any(k == "error" for k, _ in messages(d)) and idle(d))
    shown = messages(page)
    assert [k for k, _ in shown] == ["user", "error"]
    assert shown[0][1] == text
    assert "HTTP 400" in shown[1][1] and "maximum context length" in shown[1][1]
    assert page.find_element(By.CSS_SELECTOR, ".message.error").is_displayed()
    assert page.find_elements(By.CSS_SELECTOR, "#messages img") == []
    assert page.execute_script("return window.__injected === undefined;")
    # The failed turn is not part of the history; its text is back in the prompt.
    assert page.find_element(By.ID, "prompt").get_attribute("value") == text
    assert sent_requests(page)[-1]["messages"] == [{"role": "user", "content": text}]


# Replaces fetch for /v1/chat/completions with a response streaming the given byte pieces,
# 20 ms apart.
FAKE_STREAM = """
const pieces = arguments[0];
const original = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith('/v1/chat/completions')) return original(url, init);
  let i = 0;
  const body = new ReadableStream({async pull(c) {
    await new Promise(r => setTimeout(r, 20));
    if (i < pieces.length) c.enqueue(new Uint8Array(pieces[i++])); else c.close();
  }});
  return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
};
"""


def split_bytes(text: str, *cuts: int) -> list[list[int]]:
    """The UTF-8 bytes of `text` cut at the given byte offsets."""
    data = text.encode()
    bounds = [0, *cuts, len(data)]
    return [list(data[a:b]) for a, b in zip(bounds, bounds[1:])]


def chunk(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": content},
                                    "finish_reason": None}]}, ensure_ascii=False)


def test_sse_events_split_across_reads(page: WebDriver) -> None:
    stream = (": keep-alive\r\n\r\n"
              + "data: " + chunk("") + "\r\n\r\n"
              + "data: " + chunk("Hel").replace(", ", ",\r\ndata: ", 1) + "\r\n\r\n"
              + "event: message\nid: 3\ndata: " + chunk("lo wörld") + "\n\n"
              + 'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, '
                '"total_tokens": 12}}\n\n'
              + "data: [DONE]\n\n"
              + "data: " + chunk(" after the end") + "\n\n")
    data = stream.encode()
    crlf = data.index(b",\r\ndata: ") + 2               # between CR and LF, inside an event
    word = data.index("ö".encode()) + 1                  # inside a two-byte character
    cuts = sorted({crlf, data.index(b"Hel") + 2, word, data.index(b"usage") + 3,
                   data.index(b"[DONE]") + 2})
    page.execute_script(FAKE_STREAM, split_bytes(stream, *cuts))
    page.find_element(By.ID, "prompt").send_keys("Hi" + Keys.ENTER)
    wait(page, 30).until(lambda d: len(messages(d)) == 2 and idle(d))
    assert messages(page) == [("user", "Hi"), ("assistant", "Hello wörld")]
    stats = page.find_element(By.ID, "stats").text
    assert RATE.search(stats) and "7 tokens" in stats and "counted" not in stats


def test_error_event_mid_stream_keeps_the_partial_answer(page: WebDriver) -> None:
    error = {"error": {"message": "the engine failed", "type": "service_unavailable",
                       "param": None, "code": None}}
    stream = ("data: " + chunk("Part") + "\n\n" + "data: " + chunk("ial") + "\n\n"
              + "data: " + json.dumps(error) + "\n\n" + "data: [DONE]\n\n")
    page.execute_script(FAKE_STREAM, split_bytes(stream, 30, 90))
    page.find_element(By.ID, "prompt").send_keys("Hi" + Keys.ENTER)
    wait(page, 30).until(lambda d: len(messages(d)) == 3 and idle(d))
    assert messages(page) == [("user", "Hi"), ("assistant", "Partial"),
                              ("error", "the engine failed")]
    assert "counted chunks" in page.find_element(By.ID, "stats").text
