"""inference/tools.py (the tools a chat can call), scripts/eval_toolcall.py's scoring, eval_llm.py's tool loop
and the demo's tool conversations."""
import json
import os

import pytest

from conftest import REPO_ROOT
from inference import tools
from scripts.eval_toolcall import DEMO_REQUESTS, read_requests, score_call

DEMO = os.path.join(REPO_ROOT, "dataset", "demo")


@pytest.mark.parametrize("expression, result", [
    ("12*7", 84), ("12 × 7", 84), ("(3+4)^2", 49), ("10/4", 2.5), ("-3--2", -1), ("7//2 + 7%2", 4),
    ("0.1+0.2", 0.3), ("2**10", 1024), ("1,000 + 1", 1001),
])
def test_calculator_computes_arithmetic(expression, result):
    assert json.loads(tools.run_tool("calculator", {"expression": expression})) == {"result": result}


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('true')", "not Call"), ("abc", "not Name"), ("1/0", "division by zero"),
    ("2**1000", "exponent too large"), ("9**9**9", "exponent too large"), ("1e400", "result too large"),
    ("(-8)**0.5", "not a real number"), ("1 +", "not an arithmetic expression"), ("", "non-empty"),
    ("[1]", "not List"), ("x" * 300, "at most 200"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, error):
    assert error in json.loads(tools.run_tool("calculator", {"expression": expression}))["error"]


def test_calendar_dictionary_and_bad_calls():
    assert json.loads(tools.run_tool("calendar", {"date": "2024-02-28", "days": 2})) == \
        {"date": "2024-03-01", "weekday": "Friday", "weekday_zh": "星期五"}
    assert "YYYY-MM-DD" in tools.run_tool("calendar", {"date": "2024/02/28"})
    assert "days must be an integer" in tools.run_tool("calendar", {"date": "2024-02-28", "days": "2"})
    entry = json.loads(open(os.path.join(DEMO, "cedict", "entries.jsonl"), encoding="utf-8").readline())
    looked_up = json.loads(tools.run_tool("dictionary", {"word": entry["simplified"]}))
    assert looked_up == {"word": entry["simplified"], "pinyin": entry["pinyin"], "english": entry["senses"]}
    assert "not in the dictionary" in tools.run_tool("dictionary", {"word": "不存在的词语"})
    assert "no tool named 'weather'" in tools.run_tool("weather", {})
    assert "arguments must be a JSON object" in tools.run_tool("calculator", "12*7")


def test_score_call_reads_the_reply_as_the_server_does():
    expected = {"name": "calculator", "arguments": {"expression": "12*7"}}
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
    assert score_call(call % "12 * 7", expected) == dict(valid=True, right_tool=True, right_arguments=True)
    assert score_call(call % "12*8", expected) == dict(valid=True, right_tool=True, right_arguments=False)
    assert score_call(call % "12*", expected)["right_arguments"] is False  # an error is never right
    assert score_call(call.replace("calculator", "calendar") % "12*7", expected) == \
        dict(valid=True, right_tool=False, right_arguments=False)
    assert score_call('<tool_call>\n{"name": "calculator", "arguments": {"expr', expected)["valid"] is False
    assert score_call("84", expected)["valid"] is False


def test_the_demo_tool_conversations_are_what_the_tools_answer():
    rows = read_requests(DEMO_REQUESTS)
    assert len(rows) == 150 and {r["kind"] for r in rows} == {"tool:calculator", "tool:calendar", "tool:dictionary"}
    for path in (os.path.join(DEMO, "tools.jsonl"), os.path.join(DEMO, "cedict", "tools.jsonl")):
        for row in map(json.loads, open(path, encoding="utf-8")):
            user, call, result, answer = row["conversations"]
            function = call["tool_calls"][0]["function"]
            assert function == row["call"] and result["content"] == tools.run_tool(function["name"], function["arguments"])
            assert "error" not in json.loads(result["content"]) and answer["content"]
            assert [t["function"]["name"] for t in row["tools"]] == ["calculator", "dictionary", "calendar"]
    training = {json.loads(line)["conversations"][0]["content"] for line in open(os.path.join(DEMO, "tools.jsonl"))}
    assert not training & {r["conversations"][0]["content"] for r in rows}  # held out means held out


def test_the_tool_loop_runs_the_calls_and_answers_from_the_result(capsys):
    """chat_core.tool_turn: the loop eval_llm.py and the web chat share."""
    import eval_llm
    from inference.chat_core import tool_turn
    replies = iter(['<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>',
                    "12 × 7 = 84"])
    seen = []

    def generate(messages):
        seen.append(messages)
        return next(replies)

    ask = [{"role": "user", "content": "12 乘以 7？"}]
    added = tool_turn(generate, ask, tools.TOOLS, on_calls=eval_llm.print_calls)
    assert added == [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "12*7"}}}]},
        {"role": "tool", "content": '{"result": 84}'}, {"role": "assistant", "content": "12 × 7 = 84"}]
    assert seen[1] == ask + added[:2]
    assert capsys.readouterr().out == '🔧 calculator({"expression": "12*7"}) -> {"result": 84}\n'
    # a model that keeps calling stops after tool_rounds; without tools a call is just text
    looping = lambda messages: '<tool_call>\n{"name": "calendar", "arguments": {"date": "2024-01-01"}}\n</tool_call>'
    assert len(tool_turn(looping, ask, tools.TOOLS, tool_rounds=2)) == 2 * 2 + 1
    assert tool_turn(looping, ask, None) == [{"role": "assistant", "content": looping(None)}]


# -- No tool input ends a run: every failure is an error answer the model reads --------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from common.chat import parse_tool_calls  # noqa: E402

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
ARITHMETIC = st.recursive(
    st.integers(-10 ** 7, 10 ** 7).map(str) | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.sampled_from(["999999.0", "1e308", "0.5", "-1", "1e-300", "0"]),
    lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^", "×", "÷"]), inner).map(
        lambda t: f"({t[0]}){t[1]}({t[2]})") | inner.map(lambda e: f"-({e})"), max_leaves=6)


def answer_of(name, arguments):
    """run_tool's answer: it must be JSON of at most MAX_RESULT_CHARS, a result or an error."""
    text = tools.run_tool(name, arguments)
    assert isinstance(text, str) and len(text) <= tools.MAX_RESULT_CHARS
    answer = json.loads(text)
    assert isinstance(answer, dict) and (("error" in answer) == tools.is_error(text))
    return answer


@pytest.mark.parametrize("expression", ["999999.0**64", "((-1)**0.5)%2", "((-1)**0.5)*0", "1e308*10-1e308*10",
                                        "(1e308*10)*0", "999999.0**63/999999.0**63", "(-8)**(1/3)+1"])
def test_the_calculator_refuses_complex_and_non_finite_intermediates(expression):
    answer = answer_of("calculator", {"expression": expression})
    assert "error" in answer and set(answer) == {"error"}, answer


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARITHMETIC | st.text(max_size=60))
def test_no_expression_escapes_the_calculator(expression):
    answer = answer_of("calculator", {"expression": expression})
    if "result" in answer:  # a result is a finite real number within the bound
        assert isinstance(answer["result"], (int, float)) and abs(answer["result"]) <= tools.MAX_MAGNITUDE


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(["calculator", "dictionary", "calendar", "weather", "", "__init__"]) | st.text(max_size=10),
       JSON_VALUES | st.fixed_dictionaries({}, optional={"expression": JSON_VALUES, "word": JSON_VALUES,
                                                         "date": JSON_VALUES | st.dates().map(str),
                                                         "days": JSON_VALUES | st.integers()}))
def test_no_arguments_escape_any_tool(name, arguments):
    answer_of(name, arguments)


def test_a_tool_that_fails_slows_or_talks_too_much_gives_an_error_answer(monkeypatch):
    import time

    def failing(name, arguments):
        raise KeyError("boom")
    monkeypatch.setattr(tools, "call_tool", failing)
    assert "the tool failed: KeyError" in answer_of("calculator", {})["error"]
    monkeypatch.setattr(tools, "call_tool", lambda name, arguments: time.sleep(0.5) or {"result": 1})
    assert tools.run_tool("calculator", {}, timeout=0.05) == '{"error": "the tool did not answer within 0.05 s"}'
    monkeypatch.setattr(tools, "call_tool", lambda name, arguments: {"result": "字" * 10_000})
    answer = answer_of("calculator", {})
    assert "longer than" in answer["error"] and answer["partial"].startswith('{"result": "字字')


CALL_PIECES = st.sampled_from(['<tool_call>', '</tool_call>', '{"name": "calculator", "arguments": ', '{', '}', '"',
                               '{"expression": "1+1"}', '"{\\"expression\\": \\"2\\"}"', '[', ']', 'null', '\n',
                               '<think>', '</think>', '[' * 300, '1e999', 'NaN', '\\ud800', ' ', ','])


@settings(max_examples=1500, deadline=None)
@given(st.lists(CALL_PIECES | st.text(max_size=8), max_size=12).map("".join))
def test_no_reply_escapes_the_call_parser(text):
    calls = parse_tool_calls(text)
    assert calls is None or (calls and all(isinstance(c["name"], str) and c["name"] and isinstance(c["arguments"], dict)
                                           for c in calls))
    for call in calls or []:
        answer_of(call["name"], call["arguments"])
