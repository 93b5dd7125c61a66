"""scripts/serve_openai_api.py as a real process on localhost, driven by the real openai client; the
prompt fitting and streaming of inference/chat_core.py; scripts/chat_openai_api.py."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import AuthenticationError, BadRequestError, OpenAI
from transformers import AutoTokenizer

from conftest import PROJECT_TOKENIZER, REPO_ROOT, start_server, talkative_weight
from forked_python import run_python
from model.model_lora import apply_lora, load_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from common.chat import render
from inference.chat_core import PromptTooLong, fit_prompt, load_chat_model, stream_reply

HELLO = [{"role": "user", "content": "你好，请介绍一下你自己。"}]


@pytest.fixture(scope="module")
def weight(tmp_path_factory):
    return talkative_weight(tmp_path_factory.mktemp("serve") / "full_sft_64.pth")


@pytest.fixture(scope="module")
def server(weight, tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("server"), "--load_from", str(weight), "--max_seq_len", "256")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def post_raw(url, data, content_type="application/json"):
    """(status, parsed body) of a POST with the given raw bytes."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def greedy(client, messages=HELLO, **kwargs):
    return client.chat.completions.create(model="minimind", messages=messages, temperature=0, **kwargs)


def streamed(client, messages=HELLO, **kwargs):
    """(text, finish_reason, usage) of a streamed greedy answer, checking the chunk sequence."""
    chunks = list(client.chat.completions.create(model="minimind", messages=messages, temperature=0, stream=True,
                                                 **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, chunks[-1].choices[0].finish_reason, chunks[-1].usage


# ---------------------------------------------------------------------------------------------
# The real server through the openai client
# ---------------------------------------------------------------------------------------------

def test_models_endpoint(client, weight):
    assert [m.id for m in client.models.list().data] == [os.path.basename(weight).removesuffix(".pth")]


def test_non_streaming_answer_with_usage(client):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    reply = greedy(client, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    prompt_tokens = len(tokenizer(render(tokenizer, HELLO, generation_prompt=True), add_special_tokens=False).input_ids)
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    # a random tiny model does not stop on its own within 12 tokens
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 12


def test_streaming_gives_the_same_answer_and_ends_with_done(client, server):
    whole = greedy(client, max_tokens=12)
    text, finish, usage = streamed(client, max_tokens=12)
    assert text == whole.choices[0].message.content and finish == "length"
    assert usage.completion_tokens == 12 and usage.prompt_tokens == whole.usage.prompt_tokens
    body = json.dumps({"messages": HELLO, "max_tokens": 4, "stream": True}).encode()
    status, raw = post_raw(server, body)
    events = [line for line in raw.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_eight_concurrent_streaming_clients_get_complete_answers(client):
    expected = greedy(client, max_tokens=16).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: streamed(client, max_tokens=16), range(8)))
    for text, finish, usage in results:
        assert (text, finish, usage.completion_tokens) == (expected, "length", 16)


def test_stop_strings_end_the_answer_before_them(client):
    full = greedy(client, max_tokens=16).choices[0].message.content
    stop = full[4:6]
    cut = full[:full.find(stop)]
    reply = greedy(client, max_tokens=16, stop=[stop, "never-seen-stop"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    text, finish, _ = streamed(client, max_tokens=16, stop=stop)
    assert (text, finish) == (cut, "stop")


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.chat.completions.create(model="m", messages=HELLO, temperature=1.0, top_p=0.95, seed=seed,
                                              max_tokens=12).choices[0].message.content
    assert sample(123) == sample(123)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": HELLO, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": HELLO, "max_tokens": -5}).encode(), "max_tokens"),
    (json.dumps({"messages": HELLO, "max_tokens": 10 ** 9}).encode(), "max_tokens"),
    (json.dumps({"messages": HELLO, "max_tokens": 2.5}).encode(), "max_tokens"),
    (json.dumps({"messages": HELLO, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": HELLO, "stop": [1, 2]}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "很长" * 400}]}).encode(), "messages"),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(server, client, body, param):
    status, error = post_raw(server, body)
    assert status == 400
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param
    assert greedy(client, max_tokens=2).choices[0].message.content is not None


def test_openai_client_raises_on_bad_request_and_unknown_routes_are_json(client, server):
    with pytest.raises(BadRequestError, match="max_tokens"):
        greedy(client, max_tokens=0)
    try:
        urllib.request.urlopen(server + "/v1/nothing", timeout=30)
    except urllib.error.HTTPError as e:
        assert e.code == 404 and json.loads(e.read())["error"]["code"] == "not_found"


def test_api_key_and_lora_on_top(weight, tmp_path):
    torch.manual_seed(1)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    apply_lora(model, rank=4)
    for name, p in model.named_parameters():
        if "lora" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that visibly changes the answers
    save_lora(model, tmp_path / "lora_identity_64.pth")
    process, url = start_server(tmp_path, "--load_from", str(weight), "--lora_weight",
                                str(tmp_path / "lora_identity_64.pth"), "--api_key", "secret")
    try:
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=120)
        assert keyed.models.list().data[0].id == "full_sft_64+lora_identity_64"
        served = greedy(keyed, max_tokens=8).choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)
    # the same answer as the base weight with the LoRA applied by hand, different from the base alone
    chat = load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    tokenizer = chat.tokenizer
    ids = tokenizer(render(tokenizer, HELLO, generation_prompt=True), add_special_tokens=False).input_ids
    base = "".join(e["delta"] for e in stream_reply(chat, ids, 8, temperature=0))
    apply_lora(chat.model, rank=4)
    load_lora(chat.model, str(tmp_path / "lora_identity_64.pth"))
    with_lora = "".join(e["delta"] for e in stream_reply(chat, ids, 8, temperature=0))
    assert served == with_lora != base


def test_the_api_key_can_come_from_the_environment_and_help_never_shows_it(weight, tmp_path):
    script = os.path.join(REPO_ROOT, "scripts", "serve_openai_api.py")
    env = dict(os.environ, MINIMIND_API_KEY="from-env-key")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "from-env-key" not in shown.stdout
    process, url = start_server(tmp_path, "--load_from", str(weight), env=env)
    try:
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert OpenAI(base_url=url + "/v1", api_key="from-env-key", max_retries=0).models.list().data
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_chat_client_script_talks_to_the_server(server):
    result = run_python([os.path.join(REPO_ROOT, "scripts", "chat_openai_api.py"),
                         "--base_url", server + "/v1", "--prompts", "你好", "你是谁？", "--historys", "2",
                         "--temperature", "0", "--max_tokens", "6"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("🤖: ") == 2 and "👶: 你是谁？" in result.stdout


# ---------------------------------------------------------------------------------------------
# chat_core in process: the token budget and a converted folder
# ---------------------------------------------------------------------------------------------

def test_fit_prompt_drops_whole_oldest_turns_and_keeps_the_system_message():
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    system = {"role": "system", "content": "你是 MiniMind。"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"第{i}个问题：" + "天气" * 10},
                  {"role": "assistant", "content": f"第{i}个回答：" + "晴朗" * 10}]
    messages = [system] + turns + [{"role": "user", "content": "最后的问题"}]
    everything = len(tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False).input_ids)
    ids, kept = fit_prompt(tokenizer, messages, budget=everything)
    assert kept == messages  # fits: nothing dropped
    ids, kept = fit_prompt(tokenizer, messages, budget=everything - 1)
    assert len(ids) <= everything - 1
    assert kept[0] == system and kept[1]["role"] == "user"
    assert kept[1:] == messages[-(len(kept) - 1):]  # a suffix of the conversation, every message whole
    assert kept[1] == messages[3]  # exactly the oldest question and its answer went
    with pytest.raises(PromptTooLong):
        fit_prompt(tokenizer, [system, {"role": "user", "content": "长" * 500}], budget=100)


def test_stream_reply_never_sends_part_of_a_stop_string(weight):
    chat = load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    ids = chat.tokenizer(render(chat.tokenizer, HELLO, generation_prompt=True), add_special_tokens=False).input_ids
    full = "".join(e["delta"] for e in stream_reply(chat, ids, 16, temperature=0))
    stop = full[6:9]
    deltas = [e["delta"] for e in stream_reply(chat, ids, 16, temperature=0, stop=[stop])]
    assert "".join(deltas) == full[:full.find(stop)]  # deltas only append: nothing sent was taken back


def test_a_converted_folder_serves_the_same_answers(weight, tmp_path):
    from scripts.serve_openai_api import create_app
    result = run_python([os.path.join(REPO_ROOT, "scripts", "convert_model.py"), "to_transformers",
                         str(weight), str(tmp_path / "hf")], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = []
    for path in (str(weight), str(tmp_path / "hf")):
        app = create_app(load_chat_model(path, device="cpu", tokenizer_dir=PROJECT_TOKENIZER), max_seq_len=256)
        response = app.test_client().post("/v1/chat/completions",
                                          json={"messages": HELLO, "temperature": 0, "max_tokens": 10})
        assert response.status_code == 200
        answers.append(response.get_json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]


def test_a_failure_inside_the_model_is_a_json_500_and_the_server_goes_on(weight):
    from scripts.serve_openai_api import create_app
    chat = load_chat_model(str(weight), device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    served = create_app(chat, max_seq_len=256)
    app = served.test_client()
    healthy_forward = chat.model.forward
    chat.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    response = app.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert response.status_code == 500
    assert response.get_json()["error"] == {"message": "internal error: RuntimeError: out of memory",
                                            "type": "server_error", "param": None, "code": None}
    assert served.batcher.rows == []  # the failed request left the batch
    chat.model.forward = healthy_forward
    assert app.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}).status_code == 200
