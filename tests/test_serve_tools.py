"""Tool calling, reasoning_content and request limits of scripts/serve_openai_api.py, through the real openai
client over HTTP. The model is scripted (its greedy reply is fixed text), so each test controls exactly what
the server has to parse: a valid call, a malformed one, a <think> block."""
import json
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer
from werkzeug.serving import make_server

from conftest import REPO_ROOT, free_port
from forked_python import run_python
from model.model_minimind import MiniMindConfig
from scripts import serve_openai_api
from common.chat import final_reply, split_reply
from inference.chat_core import ChatModel

TOKENIZER = AutoTokenizer.from_pretrained(f"{REPO_ROOT}/model")
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CLOCK = {"type": "function", "function": {"name": "today", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "12 乘以 7 等于多少？"}]
CALL_REPLY = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'


class ScriptedModel(torch.nn.Module):
    """Stands in for a trained model whose greedy reply is fixed text (see say): logits put the next token of
    the reply first, then the end token. Records every prompt it is given."""

    def __init__(self):
        super().__init__()
        self.config = MiniMindConfig(hidden_size=64, num_hidden_layers=2)
        self.replies, self.reply, self.prompts, self.step = [], [], [], 0

    def say(self, *texts):
        """Reply texts[0] to the next prompt, texts[1] to the one after, ..., the last one from then on."""
        self.replies = [TOKENIZER.encode(text) + [TOKENIZER.eos_token_id] for text in texts]

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1:  # a new prompt
            self.prompts.append(TOKENIZER.decode(input_ids[0]))
            self.reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
            self.step = 0
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.reply[min(self.step, len(self.reply) - 1)]] = 10.0
        self.step += 1
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def served():
    model = ScriptedModel()
    chat = ChatModel(model, TOKENIZER, "scripted", torch.device("cpu"))
    app = serve_openai_api.create_app(chat, max_seq_len=2048, max_body_mb=0.05)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield model, client, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def ask(client, stream=False, messages=ASK, **kwargs):
    return client.chat.completions.create(model="scripted", messages=messages, temperature=0, stream=stream, **kwargs)


def collect(chunks):
    """The streamed message: (reasoning, content, tool calls as {index: {id, name, arguments}}, finish_reason)."""
    reasoning, content, calls, finish = "", "", {}, None
    for c in chunks:
        delta = c.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return reasoning, content, calls, finish


def test_a_tool_call_comes_back_as_tool_calls(served):
    model, client, _ = served
    model.say(CALL_REPLY)
    reply = ask(client, tools=[CALCULATOR, CLOCK])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12*7"}
    # the template showed the model both tools, in the system turn
    prompt = model.prompts[-1]
    assert "<tools>" in prompt and json.dumps(CALCULATOR["function"]["name"]) in prompt and '"today"' in prompt
    # streamed: the same call as tool-call deltas, no content
    reasoning, content, calls, finish = collect(ask(client, stream=True, tools=[CALCULATOR]))
    assert (reasoning, content, finish) == ("", "", "tool_calls")
    assert calls[0]["name"] == "calculator" and json.loads(calls[0]["arguments"]) == {"expression": "12*7"}


def test_the_tool_result_goes_back_for_the_next_turn(served):
    model, client, _ = served
    model.say("12 乘以 7 等于 84。")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"}]
    reply = ask(client, messages=history, tools=[CALCULATOR])
    assert reply.choices[0].message.content == "12 乘以 7 等于 84。" and reply.choices[0].finish_reason == "stop"
    prompt = model.prompts[-1]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n'
            '</tool_call><|im_end|>') in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call>',  # broken JSON
    '<tool_call>\n{"arguments": {"expression": "1"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}',  # never closed
])
def test_a_malformed_call_is_returned_as_its_text_never_a_500(served, reply):
    model, client, _ = served
    model.say(reply)
    message = ask(client, tools=[CALCULATOR]).choices[0]
    assert message.finish_reason == "stop" and message.message.tool_calls is None
    assert message.message.content == reply
    assert collect(ask(client, stream=True, tools=[CALCULATOR])) == ("", reply, {}, "stop")


def test_reasoning_comes_back_as_reasoning_content_and_thinking_can_be_switched_off(served):
    model, client, _ = served
    model.say("<think>\n12 乘 7：10 乘 7 是 70，2 乘 7 是 14。\n</think>\n<answer>84</answer>")
    message = ask(client).choices[0].message
    assert message.model_extra["reasoning_content"] == "12 乘 7：10 乘 7 是 70，2 乘 7 是 14。"
    assert message.content == "84"
    assert collect(ask(client, stream=True))[:2] == ("12 乘 7：10 乘 7 是 70，2 乘 7 是 14。", "84")
    model.say("84")
    ask(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "reasoning_content" not in ask(client).choices[0].message.model_extra


def test_tool_choice_forces_hides_or_names_the_tool(served):
    model, client, _ = served
    model.say('{"expression": "2+2"}}\n</tool_call>')  # the model completes the call the server started
    reply = ask(client, tools=[CALCULATOR, CLOCK], tool_choice={"type": "function", "function": {"name": "calculator"}})
    assert model.prompts[-1].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": ')
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "2+2"}
    model.say('today", "arguments": {}}\n</tool_call>')
    reply = ask(client, tools=[CALCULATOR, CLOCK], tool_choice="required")
    assert reply.choices[0].message.tool_calls[0].function.name == "today"
    model.say(CALL_REPLY)
    reply = ask(client, tools=[CALCULATOR], tool_choice="none")  # no tools shown, no calls parsed
    assert "<tools>" not in model.prompts[-1] and reply.choices[0].message.content == CALL_REPLY


def post(url, data, headers=None):
    request = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, param", [
    ({"messages": ASK, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"messages": ASK, "tools": [CALCULATOR], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "tools": [CALCULATOR], "tool_choice": {"type": "function", "function": "calculator"}},
     "tool_choice"),
    ({"messages": ASK, "chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": ASK, "chat_template_kwargs": {"thinking": True}}, "chat_template_kwargs"),
    ({"messages": ASK, "open_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "open_thinking"),
    ({"messages": [*ASK, {"role": "assistant", "content": "", "reasoning_content": 7}, *ASK]},
     "messages[1].reasoning_content"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages[1].content"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": "12*7"}}]}, {"role": "tool", "content": "84"}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": ASK + [{"role": "assistant", "content": "hi"}]}, "messages"),  # nothing left to answer
])
def test_bad_tool_requests_get_400_naming_the_field(served, body, param):
    _, _, url = served
    status, error = post(url, json.dumps(body).encode())
    assert status == 400 and error["error"]["param"] == param, error


def test_deep_json_is_400_and_a_large_body_413_and_the_server_keeps_serving(served):
    model, client, url = served
    for depth in (65, 20_000):  # 20,000 levels exhaust Python's recursion (a 500 before)
        status, error = post(url, b"[" * depth + b"]" * depth)
        assert status == 400 and "nests JSON more than 64 levels" in error["error"]["message"]
    nested_but_fine = {"messages": ASK, "metadata": json.loads("[" * 60 + "]" * 60)}
    model.say("ok")
    assert post(url, json.dumps(nested_but_fine).encode())[0] == 200
    status, error = post(url, json.dumps({"messages": [{"role": "user", "content": "x" * 60_000}]}).encode())
    assert status == 413 and error["error"]["code"] == "request_entity_too_large"
    assert ask(client).choices[0].message.content == "ok"


def test_the_api_key_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = serve_openai_api.hmac.compare_digest
    monkeypatch.setattr(serve_openai_api.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    model = ScriptedModel()
    model.say("ok")
    app = serve_openai_api.create_app(ChatModel(model, TOKENIZER, "scripted", torch.device("cpu")), api_key="s3cret")
    client = app.test_client()
    assert client.post("/v1/chat/completions", json={"messages": ASK}, headers={"Authorization": "Bearer s3creT"}
                       ).status_code == 401
    assert client.post("/v1/chat/completions", json={"messages": ASK}, headers={"Authorization": "Bearer s3cret"}
                       ).status_code == 200
    assert compared == [(b"Bearer s3creT", b"Bearer s3cret"), (b"Bearer s3cret", b"Bearer s3cret")]


def test_split_reply_parts_only_grow_while_streaming():
    text = ("<think>\n先算 <b> 10*7\n</think>\n<answer>是 84</answer>\n<tool_call>\n"
            '{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>')
    previous = ("", "")
    for end in range(len(text) + 1):
        reasoning, content, calls = split_reply(text[:end], final=False)
        assert (reasoning or "").startswith(previous[0]) and content.startswith(previous[1]) and calls is None
        previous = (reasoning or "", content)
    assert split_reply(text) == ("先算 <b> 10*7", "是 84", [{"name": "calculator", "arguments": {"expression": "12*7"}}])
    assert previous == ("先算 <b> 10*7", "是 84")


def test_final_reply_is_what_follows_the_think_block():
    assert final_reply("<think>a</think>b") == "b"
    assert final_reply("a</think>b", opened=True) == "b"  # the prompt opened <think>
    assert final_reply("a", opened=True) == ""  # never closed: all of it was thinking
    assert final_reply("plain") == "plain"
    for text, opened in [("<think>\n想\n</think>\n\n84", False), ("想\n</think>\n84", True), ("84", False),
                         ("  <think>x</think> y <answer>z</answer>", False), ("<think>never closed", False)]:
        assert split_reply(("<think>" if opened else "") + text)[1] == final_reply(text, opened).replace(
            "<answer>", "").replace("</answer>", "").strip()


def test_the_web_chat_over_the_api_folds_the_reasoning_it_gets_as_reasoning_content(served, monkeypatch):
    from streamlit.testing.v1 import AppTest
    model, _, url = served
    model.say("<think>\n先想一想。\n</think>\n<answer>84</answer>")
    monkeypatch.setenv("MINIMIND_MODEL_PATHS", "")
    page = AppTest.from_file(f"{REPO_ROOT}/scripts/web_demo.py", default_timeout=60)
    page.run()
    page.sidebar.radio(key="source").set_value(page.sidebar.radio(key="source").options[1]).run()
    page.sidebar.text_input(key="base_url").set_value(url + "/v1").run()
    page.chat_input[0].set_value("12 乘以 7？").run()
    assert not page.exception
    assistant = page.chat_message[1]
    assert assistant.expander[0].text[0].value == "先想一想。" and assistant.markdown[-1].value == "84"


@pytest.mark.parametrize("stream", ["0", "1"])
def test_the_terminal_client_shows_the_reasoning_then_the_answer(served, stream):
    model, _, url = served
    model.say("<think>\n先想一想。\n</think>\n<answer>84</answer>")
    result = run_python([f"{REPO_ROOT}/scripts/chat_openai_api.py", "--base_url", url + "/v1",
                         "--prompts", "12 乘以 7？", "--temperature", "0", "--stream", stream], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "🤖: 💭 先想一想。\n🤖: 84\n" in result.stdout


def test_the_web_chat_runs_a_tool_call_shows_it_folded_and_answers_from_the_result(served, monkeypatch):
    from streamlit.testing.v1 import AppTest
    model, _, url = served
    model.say(CALL_REPLY, "12 × 7 = 84")  # first the call, then (with the result in the prompt) the answer
    monkeypatch.setenv("MINIMIND_MODEL_PATHS", "")
    page = AppTest.from_file(f"{REPO_ROOT}/scripts/web_demo.py", default_timeout=60)
    page.run()
    page.sidebar.radio(key="source").set_value(page.sidebar.radio(key="source").options[1]).run()
    page.sidebar.text_input(key="base_url").set_value(url + "/v1").run()
    page.sidebar.toggle(key="tools").set_value(True).run()
    page.chat_input[0].set_value("12 乘以 7 等于多少？").run()
    assert not page.exception
    assert '<tool_response>\n{"result": 84}\n</tool_response>' in model.prompts[-1]  # the result went back
    messages = page.session_state["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2]["content"] == '{"result": 84}' and messages[3]["content"] == "12 × 7 = 84"
    call = page.chat_message[1].expander[0]
    assert call.label == '🔧 calculator({"expression": "12*7"})' and '{"result": 84}' in call.code[0].value
    assert page.chat_message[2].markdown[-1].value == "12 × 7 = 84"


# minimind-3's template: the generation prompt opens <think> with open_thinking, else it is an empty think block
MINIMIND3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if open_thinking is defined and open_thinking is true %}{{- '<think>\\n' }}"
    "{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def served_minimind3_template():
    tokenizer = AutoTokenizer.from_pretrained(f"{REPO_ROOT}/model")
    tokenizer.chat_template = MINIMIND3_STYLE_TEMPLATE
    model = ScriptedModel()
    app = serve_openai_api.create_app(ChatModel(model, tokenizer, "scripted", torch.device("cpu")), max_seq_len=2048)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield model, OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0)
    server.shutdown()


@pytest.mark.parametrize("switch", [{"open_thinking": True}, {"chat_template_kwargs": {"open_thinking": True}},
                                    {"enable_thinking": True}, {"chat_template_kwargs": {"enable_thinking": True}}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_that_opened_think_still_splits_reasoning_from_the_answer(served_minimind3_template, switch, stream):
    """With thinking on, minimind-3's prompt ends inside <think>: the reply has only the rest of the reasoning and
    </think>, and still comes back as reasoning_content + content. Both switch names work, top-level or in
    chat_template_kwargs."""
    model, client = served_minimind3_template
    model.say("7 乘 12 是 84。\n</think>\n\n答案是 84。")
    reply = ask(client, stream=stream, extra_body=switch)
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    if stream:
        reasoning, content, _, finish = collect(reply)
    else:
        message = reply.choices[0].message
        reasoning, content, finish = message.model_extra["reasoning_content"], message.content, "stop"
    assert (reasoning, content, finish) == ("7 乘 12 是 84。", "答案是 84。", "stop")


def test_thinking_off_and_the_template_default_give_the_empty_think_block(served_minimind3_template):
    model, client = served_minimind3_template
    model.say("答案是 84。")
    for switch in ({"open_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}}, {}):
        message = ask(client, extra_body=switch).choices[0].message
        assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert message.content == "答案是 84。" and "reasoning_content" not in message.model_extra


def test_an_assistant_messages_reasoning_content_goes_back_into_the_conversation(served):
    model, client, _ = served
    model.say("好的。")
    ask(client, messages=[*ASK, {"role": "assistant", "content": "84", "reasoning_content": "12 乘 7。"},
                          {"role": "user", "content": "再乘 2？"}])
    assert "<|im_start|>assistant\n<think>\n12 乘 7。\n</think>\n\n84<|im_end|>" in model.prompts[-1]


def test_the_web_chats_thinking_switch_reaches_the_template_and_the_reasoning_is_folded(served_minimind3_template,
                                                                                       monkeypatch):
    from streamlit.testing.v1 import AppTest
    model, client = served_minimind3_template
    model.say("先想一想。\n</think>\n\n84")
    monkeypatch.setenv("MINIMIND_MODEL_PATHS", "")
    page = AppTest.from_file(f"{REPO_ROOT}/scripts/web_demo.py", default_timeout=60)
    page.run()
    page.sidebar.radio(key="source").set_value(page.sidebar.radio(key="source").options[1]).run()
    page.sidebar.text_input(key="base_url").set_value(str(client.base_url).rstrip("/")).run()
    page.sidebar.radio(key="thinking").set_value("on").run()
    page.chat_input[0].set_value("12 乘以 7？").run()
    assert not page.exception and model.prompts[-1].endswith("<think>\n")
    assistant = page.chat_message[1]
    assert assistant.expander[0].text[0].value == "先想一想。" and assistant.markdown[-1].value == "84"
