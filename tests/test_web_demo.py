"""scripts/web_demo.py: Streamlit's AppTest for the page logic, and once end to end in headless Chromium."""
import os
import shutil
import sys
import time

import pytest
from streamlit.testing.v1 import AppTest

from conftest import PROJECT_TOKENIZER, REPO_ROOT, free_port, start_process, start_server, talkative_weight
from inference.chat_core import fit_prompt, load_chat_model, stream_reply

APP = os.path.join(REPO_ROOT, "scripts", "web_demo.py")
QUESTION = "<b>hi</b> **bold** <script>alert(1)</script>"


@pytest.fixture(scope="module")
def weight(tmp_path_factory):
    return str(talkative_weight(tmp_path_factory.mktemp("web") / "full_sft_64.pth"))


def greedy_answer(weight, question, max_tokens):
    chat = load_chat_model(weight, device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    ids, _ = fit_prompt(chat.tokenizer, [{"role": "user", "content": question}], 8192 - max_tokens)
    return "".join(e["delta"] for e in stream_reply(chat, ids, max_tokens, temperature=0))


def app(monkeypatch, weight):
    monkeypatch.setenv("MINIMIND_MODEL_PATHS", weight)
    monkeypatch.setenv("MINIMIND_TOKENIZER_DIR", PROJECT_TOKENIZER)
    page = AppTest.from_file(APP, default_timeout=120)
    page.run()
    assert not page.exception
    return page


def ask(page, question, max_tokens=16):
    page.sidebar.slider(key="temperature").set_value(0.0)
    page.sidebar.slider(key="max_tokens").set_value(max_tokens)
    page.chat_input[0].set_value(question).run()
    assert not page.exception


def test_local_weight_answers_and_user_text_stays_text(monkeypatch, weight):
    page = app(monkeypatch, weight)
    assert page.sidebar.selectbox(key="model_path").value == weight  # $MINIMIND_MODEL_PATHS listed first
    assert any(c.value == f"Model: {weight}" for c in page.caption)  # the page says which weight answers
    ask(page, QUESTION)
    user, assistant = page.chat_message
    assert [t.value for t in user.text] == [QUESTION] and not user.markdown  # st.text: never Markdown / HTML
    assert not any("<b>" in m.value or "<script>" in m.value for m in page.markdown)
    assert assistant.markdown[0].value == greedy_answer(weight, QUESTION, 16)
    assert [m["role"] for m in page.session_state["messages"]] == ["user", "assistant"]


def test_the_newest_chat_model_is_chosen_first(tmp_path):
    from inference.paths import newest_chat_model
    paths = []
    for age, name in enumerate(["grpo_192.pth", "full_sft_192.pth", "pretrain_192.pth", "hf_folder"]):
        path = tmp_path / name
        path.write_bytes(b"")
        os.utime(path, (1e9 + age, 1e9 + age))  # later in the list = newer
        paths.append(str(path))
    assert newest_chat_model(paths) == 1  # full_sft: newer than grpo; pretrain is no chat model
    assert newest_chat_model(paths[2:]) == 0


def test_thinking_is_folded_above_the_answer(monkeypatch, weight):
    page = app(monkeypatch, weight)
    page.session_state["messages"] = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\n1 加 1 等于 2。\n</think>\n<answer>\n答案是 2。\n</answer>"}]
    page.run()
    assistant = page.chat_message[1]
    assert len(assistant.expander) == 1 and "Thinking" in assistant.expander[0].label
    assert assistant.expander[0].text[0].value == "1 加 1 等于 2。"
    assert assistant.markdown[-1].value == "答案是 2。" and "<think>" not in assistant.markdown[-1].value


def test_api_source_gives_the_local_answer_and_errors_are_shown(monkeypatch, weight, tmp_path):
    process, url = start_server(tmp_path, "--load_from", weight)
    try:
        page = app(monkeypatch, weight)
        page.sidebar.radio(key="source").set_value(page.sidebar.radio(key="source").options[1]).run()
        page.sidebar.text_input(key="base_url").set_value(url + "/v1").run()
        ask(page, "你好")
        assert page.chat_message[1].markdown[0].value == greedy_answer(weight, "你好", 16)
    finally:
        process.terminate()
        process.wait(timeout=30)
    ask(page, "still there?")  # the server is gone: an error on the page, the page keeps working
    assert page.error and "Error" in page.error[0].value
    assert len(page.session_state["messages"]) == 2  # the failed turn is not kept


def test_typed_path_that_does_not_exist_is_reported(monkeypatch, weight):
    page = app(monkeypatch, weight)
    page.sidebar.text_input(key="typed_path").set_value("/nowhere/full_sft_512.pth").run()
    ask(page, "你好")
    assert "neither a .pth file nor a model folder" in page.error[0].value


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Chromium and ChromeDriver from the OS packages (chromium, chromium-driver); "
                           ".ci/run installs them")
def test_end_to_end_in_headless_chromium(weight, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = dict(os.environ, MINIMIND_MODEL_PATHS=weight, MINIMIND_TOKENIZER_DIR=PROJECT_TOKENIZER)
    streamlit = start_process([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false"],
                              f"http://127.0.0.1:{port}/_stcore/health", tmp_path / "streamlit.log", env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 120)
        box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid='stChatInputTextArea']")))
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        messages = "[data-testid='stChatMessage']"
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, messages)) >= 2)
        # the page samples (temperature 0.85): wait for a non-empty answer whose streaming cursor is gone
        answer = lambda b: b.find_elements(By.CSS_SELECTOR, messages)[1].text.replace("smart_toy", "").strip()
        wait.until(lambda b: answer(b) and not answer(b).endswith("▌"))
        time.sleep(1)
        assert len(answer(browser)) > 20
        user_text = browser.find_elements(By.CSS_SELECTOR, messages)[0].text
        assert QUESTION in user_text  # shown literally, tags and all: not parsed as HTML
        assert not browser.find_elements(By.CSS_SELECTOR, f"{messages} b")
        browser.save_screenshot(str(tmp_path / "web_demo.png"))
        assert os.path.getsize(tmp_path / "web_demo.png") > 10_000
        print(f"screenshot: {tmp_path / 'web_demo.png'}")
    finally:
        browser.quit()
        streamlit.terminate()
        streamlit.wait(timeout=30)
