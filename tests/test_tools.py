"""inference/tools.py (the tools a chat can call: this project's, MiniMind's six agent tools, --tools plug-ins),
scripts/eval_toolcall.py's scoring, eval_llm.py's tool loop and the demo's tool conversations."""
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


# -- MiniMind's agent tools: its names and schemas, deterministic answers ---------------------------------------------
@pytest.mark.parametrize("name, arguments, answer", [
    # calculate_math: MiniMind's format (the result as a string), through the safe calculator with math's names
    ("calculate_math", {"expression": "256 * 37"}, {"result": "9472"}),
    ("calculate_math", {"expression": "2^10 − 24"}, {"result": "1000"}),
    ("calculate_math", {"expression": "sqrt(144) + math.floor(2.7)"}, {"result": "14"}),
    ("calculate_math", {"expression": "log(8, 2)"}, {"result": "3"}),
    # unit_converter: MiniMind's pairs with its factors, others exact, temperatures by the real formulas
    ("unit_converter", {"value": 100, "from_unit": "km", "to_unit": "miles"}, {"result": 62.1371}),
    ("unit_converter", {"value": 10, "from_unit": "kg", "to_unit": "pounds"}, {"result": 22.0462}),
    ("unit_converter", {"value": "5", "from_unit": "英尺", "to_unit": "cm"}, {"result": 152.4}),
    ("unit_converter", {"value": 30, "from_unit": "celsius", "to_unit": "fahrenheit"}, {"result": 86.0}),
    ("unit_converter", {"value": 212, "from_unit": "°F", "to_unit": "摄氏度"}, {"result": 100.0}),
    # get_current_weather: MiniMind's table, however the city is written; its default for a city it does not list
    ("get_current_weather", {"location": "北京"}, {"city": "北京", "temperature": "28°C", "humidity": "65%",
                                                  "condition": "晴"}),
    ("get_current_weather", {"location": "new york"}, {"city": "new york", "temperature": "8°C", "humidity": "65%",
                                                      "condition": "多云"}),
    ("get_current_weather", {"location": "苏州"}, {"city": "苏州", "temperature": "22°C", "humidity": "65%",
                                                  "condition": "晴"}),
    # get_current_time: the fixed clock (2025-03-07 06:30 UTC) gives MiniMind's table, and any zone from it
    ("get_current_time", {}, {"datetime": "2025-03-07 14:30:00", "timezone": "Asia/Shanghai"}),
    ("get_current_time", {"timezone": "America/New_York"}, {"datetime": "2025-03-07 01:30:00",
                                                           "timezone": "America/New_York"}),
    ("get_current_time", {"timezone": "Australia/Sydney"}, {"datetime": "2025-03-07 17:30:00",
                                                           "timezone": "Australia/Sydney"}),
    ("get_current_time", {"timezone": "asia/kolkata"}, {"datetime": "2025-03-07 12:00:00", "timezone": "Asia/Kolkata"}),
    # get_exchange_rate: MiniMind's table, then inverse and cross rates (4 significant digits)
    ("get_exchange_rate", {"from_currency": "USD", "to_currency": "CNY"}, {"from": "USD", "to": "CNY", "rate": 7.21}),
    ("get_exchange_rate", {"from_currency": "人民币", "to_currency": "usd"}, {"from": "CNY", "to": "USD",
                                                                          "rate": 0.1387}),
    ("get_exchange_rate", {"from_currency": "EUR", "to_currency": "JPY"}, {"from": "EUR", "to": "JPY", "rate": 163.5}),
    # translate_text: MiniMind's phrase table
    ("translate_text", {"text": "你好世界", "target_language": "english"}, {"translated_text": "Hello World"}),
    ("translate_text", {"text": "'Good morning'", "target_language": "中文"}, {"translated_text": "早上好"}),
])
def test_minimind_agent_tools_answer_from_computation_or_its_tables(name, arguments, answer):
    assert json.loads(tools.run_tool(name, arguments)) == answer


@pytest.mark.parametrize("name, arguments, error", [
    ("calculate_math", {"expression": "__import__('os')"}, "not Call"),
    ("calculate_math", {"expression": "math.os"}, "not Attribute"),
    ("calculate_math", {"expression": "sqrt(-1)"}, "math domain error"),
    ("calculate_math", {"expression": "exp(1000)"}, "math range error"),
    ("unit_converter", {"value": 5, "from_unit": "kg", "to_unit": "km"}, "cannot convert kg to km"),
    ("unit_converter", {"value": 5, "from_unit": "parsec", "to_unit": "km"}, "unknown unit"),
    ("unit_converter", {"from_unit": "km", "to_unit": "miles"}, "value must be"),
    ("get_current_weather", {}, "location must be"),
    ("get_current_time", {"timezone": "../../etc/passwd"}, "unknown time zone"),
    ("get_current_time", {"timezone": "zone.tab"}, "unknown time zone"),
    ("get_exchange_rate", {"from_currency": "BTC", "to_currency": "USD"}, "unknown currency"),
    ("translate_text", {"text": "随便一句话", "target_language": "english"}, "no offline translation"),
])
def test_minimind_agent_tools_refuse_bad_calls(name, arguments, error):
    assert error in json.loads(tools.run_tool(name, arguments))["error"]


def test_the_agent_tools_carry_minimind_schemas_and_the_clock_can_be_set(monkeypatch):
    import datetime
    assert [t["function"]["name"] for t in tools.AGENT_TOOLS] == [
        "calculate_math", "unit_converter", "get_current_weather", "get_current_time", "get_exchange_rate",
        "translate_text"]
    assert tools.AGENT_TOOLS[1]["function"]["parameters"]["required"] == ["value", "from_unit", "to_unit"]
    assert {t["function"]["name"] for t in tools.BUILTIN_TOOLS} == set(tools.FUNCTIONS) == tools.BUILTIN.names
    monkeypatch.setattr(tools, "_clock", tools.CLOCK)
    tools.use_clock(datetime.datetime(2024, 12, 31, 23, 0, tzinfo=datetime.timezone.utc))
    assert tools.current_time("Asia/Tokyo")["datetime"] == "2025-01-01 08:00:00"
    tools.use_clock(None)  # the real clock
    assert tools.current_time("UTC")["datetime"] >= "2025-03-07"
    with pytest.raises(ValueError, match="time zone"):
        tools.use_clock(datetime.datetime(2024, 1, 1))


# -- --tools package.module: tools of your own -----------------------------------------------------------------------
PLUGIN = """
TOOLS = [{"type": "function", "function": {"name": "word_count", "parameters": {"type": "object", "properties":
          {"text": {"type": "string"}}, "required": ["text"]}}},
         {"type": "function", "function": {"name": "get_current_weather", "parameters": {}}},
         {"type": "function", "function": {"name": "echo", "parameters": {}}},
         {"type": "function", "function": {"name": "broken", "parameters": {}}}]


def call(name, arguments):
    if name == "word_count":
        if not isinstance(arguments.get("text"), str):
            raise ValueError("text must be a string")
        return {"words": len(arguments["text"].split())}
    if name == "get_current_weather":   # replaces the built-in one
        return '{"condition": "sunny"}'
    if name == "echo":                  # plain text: sent as the result
        return arguments.get("say", "")
    return {"value": object()}          # not JSON: the tool's failure
"""


def test_a_tool_module_adds_its_tools_and_replaces_built_in_ones(tmp_path, monkeypatch):
    (tmp_path / "my_agent_tools.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    toolset = tools.load_tools("my_agent_tools")
    assert {"word_count", "echo", "calculator", "translate_text"} <= toolset.names
    assert json.loads(toolset.run("word_count", {"text": "one two three"})) == {"words": 3}
    assert json.loads(toolset.run("word_count", {"text": 3})) == {"error": "text must be a string"}
    assert json.loads(toolset.run("get_current_weather", {"location": "北京"})) == {"condition": "sunny"}
    assert json.loads(toolset.run("echo", {"say": "hi"})) == {"result": "hi"}
    assert "the tool failed: TypeError" in json.loads(toolset.run("broken", {}))["error"]
    assert json.loads(toolset.run("calculator", {"expression": "12*7"})) == {"result": 84}  # built-ins still there
    assert tools.is_error(toolset.run("word_count", "one two"))  # arguments must be an object, as for any tool
    # eval_toolcall scores a call with the same tools
    reply = '<tool_call>\n{"name": "word_count", "arguments": {"text": "a b"}}\n</tool_call>'
    assert score_call(reply, {"name": "word_count", "arguments": {"text": "c d"}}, toolset)["right_arguments"]


@pytest.mark.parametrize("source, error", [
    (None, "cannot import it (ModuleNotFoundError"),
    ("raise RuntimeError('boom')", "cannot import it (RuntimeError: boom)"),
    ("def call(name, arguments): return {}", "its TOOLS is missing"),
    ("TOOLS = [{'type': 'function', 'function': {}}]\ndef call(name, arguments): return {}", "its TOOLS is missing"),
    ("TOOLS = [{'function': {'name': 'a'}}, {'function': {'name': 'a'}}]\ndef call(n, a): return {}", "twice"),
    ("TOOLS = [{'type': 'function', 'function': {'name': 'a'}}]", "it has no call(name, arguments)"),
], ids=["not there", "fails to import", "no TOOLS", "a tool without a name", "a name twice", "no call"])
def test_a_module_that_is_not_a_tool_module_is_refused_with_the_interface(tmp_path, monkeypatch, source, error):
    name = f"bad_tools_{abs(hash(source))}"
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        tools.load_tools(name)
    assert error in str(refused.value) and f"--tools {name}" in str(refused.value)
    assert tools.INTERFACE in str(refused.value) or error == "twice"  # what a tool module must define
    assert tools.load_tools(None) is tools.load_tools("") is tools.BUILTIN


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
@given(st.sampled_from(sorted(tools.FUNCTIONS) + ["weather", "", "__init__"]) | st.text(max_size=10),
       JSON_VALUES | st.fixed_dictionaries({}, optional={
           "expression": JSON_VALUES | st.sampled_from(["sqrt(2)", "log(0)", "pow(9, 99)", "math.e ** 70", "pi"]),
           "word": JSON_VALUES, "date": JSON_VALUES | st.dates().map(str), "days": JSON_VALUES | st.integers(),
           "value": JSON_VALUES, "from_unit": JSON_VALUES | st.sampled_from(sorted(tools.UNITS)),
           "to_unit": JSON_VALUES | st.sampled_from(sorted(tools.UNITS)), "location": JSON_VALUES,
           "timezone": JSON_VALUES | st.sampled_from(["Asia/Shanghai", "UTC", "Etc/GMT+12", "/etc", "..", "北京"]),
           "from_currency": JSON_VALUES | st.sampled_from(tools.CURRENCIES),
           "to_currency": JSON_VALUES | st.sampled_from(tools.CURRENCIES), "text": JSON_VALUES,
           "target_language": JSON_VALUES}))
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
