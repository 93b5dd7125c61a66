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
