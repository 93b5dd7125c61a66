"""Property-based tests (hypothesis) of scripts/serve_openai_api.py's request parsing, in process through Flask's
test client: arbitrary JSON, raw bytes, and valid bodies with one field mutated (wrong type, out of range, bool for
int, huge ints, NaN, nesting, odd token ids, odd text / id mixes, ...) sent to every POST endpoint. Whatever comes
in, the answer is a 2xx or a 4xx in OpenAI's error shape naming the offending field - never a 5xx - and the server
goes on serving. The model is a random 64x2 MiniMind and the context 48 tokens, so a valid request costs
milliseconds."""
import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from conftest import REPO_ROOT, tiny_model
from inference.chat_core import ChatModel
from scripts import serve_openai_api

MAX_SEQ_LEN = 48
VOCAB = 6400
ROOT = "@ROOT@"  # stands for the --weight_update_root folder, filled in when a body is sent
FUZZ = settings(max_examples=600, deadline=None, database=None)  # database=None: no .hypothesis/ in the checkout

TOOL = {"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                         "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
# valid bodies, each using most of its endpoint's fields (a mutation of one of them must be answered sensibly)
VALID = {
    "/v1/chat/completions": {
        "model": "tiny", "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{\"x\": \"1\"}"}}]},
            {"role": "tool", "content": "1"}],
        "tools": [TOOL], "tool_choice": "none", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "seed": 1,
        "stream": False, "stop": ["\n\n"], "n": 1, "chat_template_kwargs": {"enable_thinking": False}},
    "/generate": {
        "input_ids": [[1, 2, 3], [4, 5]], "return_logprob": True, "sampling_params": {
            "temperature": 0.7, "max_new_tokens": 2, "top_p": 1.0, "top_k": -1, "stop_token_ids": [2],
            "sampling_seed": 1, "skip_special_tokens": True, "no_stop_trim": False, "ignore_eos": False,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}},
    "/v1/completions": {
        "model": "tiny", "prompt": ["1+1=", [1, 2, 3]], "max_tokens": 2, "temperature": 0.7, "top_p": 1.0, "top_k": -1,
        "seed": 3, "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True, "stop": ["\n"],
        "stop_token_ids": [2], "n": 1, "best_of": 1, "echo": False, "stream": False, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0},
    "/update_weights_from_disk": {"model_path": ROOT + "/broken", "weight_version": "v1"},
    "/collective_rpc": {"method": "reload_weights", "kwargs": {"weights_path": ROOT + "/broken"}},
}
# SGLang's per-prompt sampling_params: one object per prompt of the batch
VALID["/generate (per prompt)"] = dict(VALID["/generate"], sampling_params=[
    VALID["/generate"]["sampling_params"], dict(VALID["/generate"]["sampling_params"], temperature=0, top_k=5)])
# fields the valid bodies leave out, which a mutation may add
EXTRA = {
    "/v1/chat/completions": [("max_completion_tokens",), ("open_thinking",), ("enable_thinking",), ("logprobs",),
                             ("messages", 4), ("messages", 1, "tool_calls"), ("messages", 3, "reasoning_content"),
                             ("chat_template_kwargs", "open_thinking"), ("tools", 1)],
    "/generate": [("input_ids", 2), ("sampling_params", "ignore_eos"), ("sampling_params", "n"), ("text",)],
    "/v1/completions": [("prompt", 2), ("suffix",), ("user",)],
    "/update_weights_from_disk": [("load_format",)],
    "/collective_rpc": [("args",), ("kwargs", "load_format")],
}
EXTRA["/generate (per prompt)"] = [("input_ids", 2), ("text",), ("sampling_params", 2), ("sampling_params", 1, "n"),
                                   ("sampling_params", 0, "ignore_eos")]

# -- values ------------------------------------------------------------------------------------------------
ODD_NUMBERS = st.sampled_from([0, 1, -1, 2, 47, 48, 6399, 6400, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63,
                               10 ** 30, 0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1e-7, 2.0000001, 1e308,
                               float("nan"), float("inf"), float("-inf"), True, False])
ODD_STRINGS = st.sampled_from(["", " ", "none", "auto", "required", "user", "assistant", "tool", "function", "text",
                               "reload_weights", "\x00", "\ud800", "<|im_end|>", "<think>", "<tool_call>", "{}", "1",
                               ROOT, ROOT + "/broken", ROOT + "/broken/config.json", ROOT + "/missing",
                               ROOT + "/..", ROOT + "/broken\x00x", "/", "."])
KEYS = st.sampled_from(["role", "content", "type", "function", "name", "arguments", "text", "weights_path",
                        "open_thinking", "enable_thinking", "temperature", "max_new_tokens", "x"]) | st.text(max_size=4)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ODD_NUMBERS | st.text(max_size=8) | ODD_STRINGS
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                    max_leaves=10)
TOKEN = st.integers(-3, VOCAB + 3) | st.sampled_from([True, False, 2 ** 63, -2 ** 63, 10 ** 30, 1.0, 2.5,
                                                      float("nan"), "1", None])
TOKENS = st.lists(TOKEN, max_size=5) | st.lists(st.lists(TOKEN, max_size=3) | st.text(max_size=4), max_size=3)
NUMBER = ODD_NUMBERS | st.sampled_from([-1, 0, 1, 2, 2.5, 1e-6, 1e-40]) | st.integers(-2, 50) | st.floats(0, 2)
# plausible values for a field, by name: what gets past the first checks to the deeper ones
PLAUSIBLE = {
    **{name: NUMBER for name in ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
                                 "max_new_tokens", "seed", "sampling_seed", "n", "best_of", "logprobs", "min_p",
                                 "repetition_penalty", "presence_penalty", "frequency_penalty")},
    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"]),
    "content": st.text(max_size=12) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                       "text": st.text(max_size=5) | SCALARS})),
    "input_ids": TOKENS, "stop_token_ids": TOKENS,
    "prompt": TOKENS | st.text(max_size=12) | st.lists(st.text(max_size=6) | TOKEN | st.lists(TOKEN, max_size=3),
                                                       max_size=3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3) | SCALARS, max_size=6),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"function": "calculator"},
                                    {"type": "function", "function": {"name": "calculator"}},
                                    {"type": "function", "function": {"name": "other"}}]),
    "tools": st.lists(st.just(TOOL) | JSON, max_size=2),
    "tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
        {"name": st.text(max_size=4) | SCALARS, "arguments": st.text(max_size=8) | JSON})}) | JSON, max_size=2),
    "sampling_params": st.lists(st.dictionaries(st.sampled_from(["temperature", "max_new_tokens", "top_k", "min_p"]),
                                                ODD_NUMBERS, max_size=2), max_size=3),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["open_thinking", "enable_thinking", "x"]), SCALARS,
                                            max_size=2),
}
DELETE = object()


def paths(value, prefix=()):
    """Every key / index path inside a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    found = []
    for key, child in items:
        found += [prefix + (key,)] + paths(child, prefix + (key,))
    return found


def mutated(body, path, value):
    """body with the field at path set to value (appended at a list's end), or removed for DELETE."""
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    last = path[-1]
    if value is DELETE:
        if isinstance(target, dict):
            target.pop(last, None)
        elif last < len(target):
            del target[last]
    elif isinstance(target, list) and last == len(target):
        target.append(value)
    else:
        target[last] = value
    return body


@st.composite
def near_valid(draw, url):
    """(the mutated path, a body): the endpoint's valid body with one field replaced, added or removed."""
    every = paths(VALID[url]) + EXTRA[url]
    # the top-level fields as often as all the nested ones together
    path = draw(st.sampled_from([p for p in every if len(p) == 1]) | st.sampled_from(every))
    name = next((k for k in reversed(path) if isinstance(k, str)), "")
    value = draw(st.just(DELETE) | PLAUSIBLE.get(name, SCALARS) | JSON)
    return path, mutated(VALID[url], path, value)


# -- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(test client, weight root): one app for every example, the batcher decoding in its own thread."""
    root = tmp_path_factory.mktemp("fuzz_weights")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{}")  # a model folder that cannot be loaded
    tokenizer = AutoTokenizer.from_pretrained(f"{REPO_ROOT}/model")
    chat = ChatModel(tiny_model(), tokenizer, "tiny", torch.device("cpu"))
    app = serve_openai_api.create_app(chat, max_seq_len=MAX_SEQ_LEN, weight_update_root=str(root))
    return app.test_client(), str(root)


def post(served, url, body):
    """Send body (a JSON value, or raw bytes) to the endpoint ("/generate (per prompt)" is /generate); ROOT in it
    becomes the weight root."""
    client, root = served
    data = body if isinstance(body, bytes) else json.dumps(body).replace(ROOT, root).encode()
    return client.post(url.split(" ")[0], data=data, content_type="application/json")


def check(response, field=None):
    """A 2xx, or a 4xx in OpenAI's error shape (SGLang's for a refused weight update) whose param or message names
    `field` (the top-level field a mutation was in: messages for messages[2].role)."""
    text = response.get_data(as_text=True)  # a streamed answer runs to its end here
    assert response.status_code < 500, text
    if response.status_code < 400:
        return
    answer = json.loads(text)
    if "error" not in answer:  # SGLang's {"success": false, "message"}: it names the folder, not the field
        assert answer["success"] is False and answer["message"], answer
        return
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == "invalid_request_error", error
    # not field errors: a valid setting that leaves no room for the prompt (the prompt is named), a folder that
    # cannot be loaded (the folder is named)
    if field is not None and response.status_code == 400 and error["code"] not in ("context_length_exceeded",
                                                                                     "reload_failed"):
        assert field in f"{error['param']} {error['message']}", (field, error)


URLS = list(VALID)


def test_the_valid_bodies_are_served(served):
    for url in URLS[:3] + URLS[-1:]:
        response = post(served, url, VALID[url])
        assert response.status_code == 200, response.get_data(as_text=True)


@pytest.mark.parametrize("url", URLS[:3] + URLS[-1:])
@FUZZ
@given(case=st.data())
def test_a_body_with_one_field_mutated_is_served_or_refused_naming_it(served, url, case):
    path, body = case.draw(near_valid(url))
    check(post(served, url, body), path[0])


@pytest.mark.parametrize("url", ["/update_weights_from_disk", "/collective_rpc"])
@settings(FUZZ, max_examples=150)  # fewer: a try to load the broken folder takes ~15 ms
@given(case=st.data())
def test_a_weight_update_with_one_field_mutated_is_refused_naming_it(served, url, case):
    path, body = case.draw(near_valid(url))
    check(post(served, url, body), path[0])


@pytest.mark.parametrize("url", URLS[:-1])
@settings(FUZZ, max_examples=200)
@given(body=JSON | st.dictionaries(st.sampled_from(sorted({p[0] for u in URLS for p in paths(VALID[u])})),
                                   JSON, max_size=4))
def test_any_json_value_is_served_or_refused(served, url, body):
    check(post(served, url, body))


@pytest.mark.parametrize("url", URLS[:-1])
@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_raw_bytes_are_refused_as_json_errors(served, url, raw):
    check(post(served, url, raw))


GENERATE_PARAMS = VALID["/generate"]["sampling_params"]


@pytest.mark.parametrize("url, body, status, param", [
    # transformers' temperature warper refused an int (1 -> 500), and 1e-300 overflowed the logits to inf (500)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1},
     200, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 1e-300}, 200, None),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {**GENERATE_PARAMS, "temperature": 2}}, 200, None),
    # kwargs not an object (AttributeError: 500), a NUL in the folder's path (ValueError from realpath: 500)
    ("/collective_rpc", {"method": "reload_weights", "kwargs": 1}, 400, "kwargs"),
    ("/update_weights_from_disk", {"model_path": ROOT + "/\x00"}, 400, None),
    # a lone surrogate: valid JSON, but the tokenizer (TypeError: 500) and the file system refused it
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfff"}]}, 400, "messages[0].content"),
    ("/update_weights_from_disk", {"model_path": ROOT + "/\ud800"}, 400, "model_path"),
    # stop ids out of the vocabulary or bools were taken (and never matched); settings are named where they are
    ("/generate", {"input_ids": [1], "sampling_params": {**GENERATE_PARAMS, "stop_token_ids": [True]}}, 400,
     "sampling_params.stop_token_ids"),
    ("/v1/completions", {"prompt": [1], "max_tokens": 2, "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("/generate", {"input_ids": [1], "sampling_params": {**GENERATE_PARAMS, "top_k": 1.5}}, 400,
     "sampling_params.top_k"),
    ("/generate", {"input_ids": [1]}, 400, "sampling_params.max_new_tokens"),  # the default 128 passes 48
])
def test_what_the_fuzzing_found(served, url, body, status, param):
    response = post(served, url, body)
    check(response)
    assert response.status_code == status, response.get_data(as_text=True)
    if param is not None:
        assert response.get_json()["error"]["param"] == param


def test_the_server_still_answers_after_the_fuzzing(served):
    """No decoding thread died on the way: valid requests are still answered (a dead one would never answer)."""
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(post, served, url, VALID[url]) for url in URLS[:3] + URLS[-1:]]
        assert [a.result(timeout=60).status_code for a in answers] == [200] * 4
