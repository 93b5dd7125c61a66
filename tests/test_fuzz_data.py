"""Property-based tests (hypothesis) of dataset/lm_dataset.py's row readers. Whatever a JSONL line holds - any JSON
value, a valid row with a field mutated (wrong type, missing, empty, unknown role, tool_calls / tools as strings that
are not JSON or JSON of the wrong shape, non-string reasoning_content, gt not a list, reserved names, ...), text that
is not JSON, bytes that are not UTF-8, lone surrogate escapes, NaN / Infinity, numbers of 5,000 digits, arrays nested
thousands deep - a reader either loads it or reports it as a bad line naming the file and line: skipped and counted
with on_bad_line="skip", a DataError with "error". Never another exception.

The per-row functions (pretrain_row, sft_row, ..., normalise_messages, validate_*) are called directly, thousands of
times; the loaders (datasets-based, slow per call) get one file of 20 to 50 generated lines per example, and their
counts and rows are compared line by line with what _parse_batch / AgentRLDataset.parse say about each line. The
inputs that made a reader fail before are pinned at the end (test_found_defects_are_bad_lines)."""
import copy
import functools
import json
import os
import tempfile

import datasets
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jinja2 import TemplateError
from transformers import AutoTokenizer

from common.chat import render
from conftest import REPO_ROOT
from dataset import lm_dataset
from dataset.lm_dataset import (CUT_OFF, ROLES, ROW_BUILDERS, AgentRLDataset, DataError, DPODataset,
                                PretrainDataset, RLAIFDataset, SFTDataset, normalise_messages, read_conversation,
                                validate_messages, validate_tool_calls)

datasets.disable_progress_bars()
MAX_LENGTH = 64
ROWS = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILES = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LOADERS = {"pretrain": PretrainDataset, "sft": SFTDataset, "dpo": DPODataset, "rlaif": RLAIFDataset}


@functools.cache
def tokenizer():
    """The project's tokenizer (not a fixture: hypothesis would print its 40-line repr with each failing example)."""
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


# --------------------------------------------------------------------------------------------
# What is generated
# --------------------------------------------------------------------------------------------

FIELDS = ["role", "content", "tool_calls", "tools", "reasoning_content", "function", "name", "arguments", "type",
          "text", "conversations", "chosen", "rejected", "prompt", "gt", "conversation", "answers"]
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "\n", "你好", "<|im_start|>assistant\n", "<|im_end|>",
                                               "<think>", "<tool_call>", "{}", "[]", "null", "{{ x }}"])
NONBLANK = TEXT.filter(str.strip) | st.sampled_from(["答", "ok", "42"])
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT  # floats: NaN and infinities too
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
NAME = st.text(min_size=1, max_size=8)
ARGUMENTS = st.dictionaries(st.text(max_size=5), st.integers() | TEXT, max_size=2) | TEXT
BARE_CALL = st.fixed_dictionaries({"name": NAME, "arguments": ARGUMENTS})
CALL = BARE_CALL | st.fixed_dictionaries({"type": st.just("function"), "function": BARE_CALL})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAME, "description": TEXT, "parameters": st.just({"type": "object", "properties": {}})})})
# strings that are not JSON, or JSON of every wrong shape: what a mutated tools / tool_calls / role ... becomes
ODD = st.sampled_from(["", " ", [], {}, None, 0, -1, 1.5, True, "bot", "Assistant", "not json {", "[1, 2", "NaN",
                       '{"name": 1}', '[{"function": 5}]', '[{"function": {"name": "f"}}]', '[{"name": "f"}]', "null",
                       '"text"', "[]", "{}", "[" * 3000 + "]" * 3000, '{"name": "f", "arguments": ' + "9" * 5000 + "}",
                       [{"function": {"name": "f", "arguments": {}}}], {"name": "f", "arguments": "{}"}])
REPLACEMENT = JSON | ODD | JSON.map(json.dumps)


@st.composite
def exchange(draw):
    """An assistant answer, perhaps after tool calls (as a list, one call, or either as a JSON string) and their
    results, perhaps with reasoning_content."""
    turns = []
    if draw(st.booleans()):
        calls = draw(st.lists(CALL, min_size=1, max_size=2))
        form = draw(st.sampled_from(["list", "one", "list as JSON", "one as JSON"]))
        value = {"list": calls, "one": calls[0], "list as JSON": json.dumps(calls),
                 "one as JSON": json.dumps(calls[0])}[form]
        turns.append({"role": "assistant", "content": draw(st.sampled_from([None, ""]) | TEXT), "tool_calls": value})
        turns += [{"role": "tool", "content": draw(TEXT)} for _ in calls]
    answer = {"role": "assistant", "content": draw(NONBLANK)}
    if draw(st.booleans()):
        answer["reasoning_content"] = draw(TEXT)
    return turns + [answer]


@st.composite
def conversation(draw, ending):
    """(messages, row-level tools) of a valid conversation. ending "answer": it ends with an assistant answer (SFT,
    DPO); "request": with the user's request, perhaps followed by an assistant placeholder or answer (RL)."""
    tools = draw(st.none() | st.lists(TOOL, min_size=1, max_size=2))
    place = draw(st.sampled_from(["system", "system as JSON", "row", "row as JSON"]))
    messages = []
    if tools and place.startswith("system"):
        messages.append({"role": "system", "content": draw(TEXT),
                         "tools": json.dumps(tools) if place.endswith("JSON") else tools})
    elif draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(0, 2))):
        messages += [{"role": "user", "content": draw(TEXT)}] + draw(exchange())
    messages.append({"role": "user", "content": draw(TEXT)})
    if ending == "answer":
        messages += draw(exchange())
    elif draw(st.booleans()):
        messages.append({"role": "assistant", "content": draw(st.sampled_from(["", "答"]))})
    row_tools = None
    if tools and place.startswith("row"):
        row_tools = json.dumps(tools) if place.endswith("JSON") else tools
    return messages, row_tools


def with_tools(row, tools):
    return {**row, "tools": tools} if tools is not None else row


@st.composite
def dpo_row(draw):
    chosen, rejected = draw(NONBLANK), draw(NONBLANK)
    rejected += "不" if rejected == chosen else ""  # a preference needs two different answers
    if draw(st.booleans()):
        return {"prompt": draw(TEXT), "chosen": chosen, "rejected": rejected}
    messages, _ = draw(conversation("request"))
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


VALID = {
    "pretrain": st.fixed_dictionaries({"text": TEXT}, optional={"id": st.integers(), "source": TEXT}),
    "sft": conversation("answer").map(lambda c: with_tools({"conversations": c[0]}, c[1])),
    "dpo": dpo_row(),
    "rlaif": st.tuples(conversation("request"), st.fixed_dictionaries(
        {}, optional={"answers": st.lists(TEXT, max_size=2), "task": TEXT, "gt": st.lists(TEXT, max_size=2)})).map(
        lambda c: with_tools({"conversations": c[0][0], **c[1]}, c[0][1])),
    "agent": st.tuples(conversation("request"), st.lists(TEXT | st.integers(), max_size=3)).map(
        lambda c: with_tools({"conversations": c[0][0], "gt": c[1]}, c[0][1])),
}


def locations(value, path=()):
    """The path (keys and indices) of every value inside a JSON value."""
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from locations(child, path + (key,))


@st.composite
def mutated(draw, valid):
    """A valid row with one or two places changed: replaced by any JSON value or an odd one, deleted, or given a new
    field (reasoning_content, tool_calls, tools, prompt, ... of any value). The result may still be valid."""
    row = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 2))):
        paths = list(locations(row))[1:]
        if not paths:
            break
        *parent_path, key = draw(st.sampled_from(paths))
        parent = row
        for step in parent_path:
            parent = parent[step]
        operation = draw(st.sampled_from(["replace", "delete", "add field"]))
        if operation == "delete":
            del parent[key]
        elif operation == "add field" and isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELDS))] = copy.deepcopy(draw(REPLACEMENT))
        else:
            parent[key] = copy.deepcopy(draw(REPLACEMENT))  # ODD's lists and dicts are shared
    return row


def any_row(kind):
    """Rows for direct calls: valid, mutated, or an arbitrary JSON object."""
    return VALID[kind] | mutated(VALID[kind]) | st.dictionaries(st.sampled_from(FIELDS) | TEXT, JSON, max_size=4)


def surrogate_escaped(row, surrogate):
    """The row's JSON text with a lone UTF-16 surrogate (written as \\udXXX) inserted into its first string."""
    text = json.dumps(row)
    quote = text.index('"', text.index(":")) + 1 if ":" in text else 1
    return text[:quote] + f"\\u{surrogate:04x}" + text[quote:]


@st.composite
def bad_lines(draw, kind):
    """Raw lines (bytes) that no reader may accept, however it reports them."""
    valid = json.dumps(draw(VALID[kind]), ensure_ascii=draw(st.booleans())).encode()
    choice = draw(st.sampled_from(["bad utf-8", "surrogate", "truncated", "deep", "huge int", "not an object"]))
    if choice == "bad utf-8":  # bytes that are not UTF-8 anywhere in an otherwise valid row
        at = draw(st.integers(0, len(valid)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
                                     b"\xe4\xbd"]))
        return valid[:at] + junk + valid[at:]
    if choice == "surrogate":
        return surrogate_escaped(json.loads(valid), draw(st.integers(0xD800, 0xDFFF))).encode()
    if choice == "truncated":  # a proper prefix of a JSON object is never a JSON object
        return valid[:draw(st.integers(1, len(valid) - 1))]
    if choice == "deep":
        n = draw(st.sampled_from([5000, 10000, 100000]))
        return draw(st.sampled_from(["[" * n, "[" * n + "]" * n, '{"text": ' + "[" * n + "]" * n + "}",
                                     '{"a": ' * n + "1" + "}" * n])).encode()
    if choice == "huge int":  # json.loads refuses integers of over 4,300 digits with a ValueError
        return valid[:-1] + b', "n": ' + b"7" * draw(st.integers(4301, 6000)) + b"}"
    return json.dumps(draw(SCALAR | st.lists(JSON, max_size=3))).encode()


# A line of a generated file: ("valid", text) must load (or be cut off at max_length); ("bad", bytes) must be
# reported; ("any", text) is judged by the row functions; ("blank", text) is counted as blank.
def lines(kind):
    valid = VALID[kind].map(lambda r: ("valid", json.dumps(r, ensure_ascii=False)))
    return st.one_of(
        valid, valid,  # twice as likely: a file needs good rows for the counts to mean something
        mutated(VALID[kind]).map(lambda r: ("any", json.dumps(r, ensure_ascii=False))),
        JSON.map(lambda v: ("any", json.dumps(v))),
        st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s).map(lambda s: ("any", s)),
        st.sampled_from(['{"text": NaN}', '{"text": "x", "score": Infinity}', "null", "NaN", "[]", "{}", '"text"',
                         '{"conversations": -Infinity}', "[" * 200 + "]" * 200]).map(lambda s: ("any", s)),
        bad_lines(kind).map(lambda b: ("bad", b)),
        st.sampled_from(["", "   ", "\t"]).map(lambda s: ("blank", s)))


# --------------------------------------------------------------------------------------------
# The per-row functions, called directly
# --------------------------------------------------------------------------------------------

def build(kind, row, tok):
    """A row builder's answer, checked: (row, None) or (None, a reason in words). A TemplateError (the chat template
    refusing a row) is the one exception the loader turns into a bad-line report; a row the validators let through
    must render, so it counts as a failure here too."""
    try:
        built, error = ROW_BUILDERS[kind](row, tok, MAX_LENGTH)
    except TemplateError as err:
        raise AssertionError(f"the validators let through a row the template cannot render: {err}") from err
    assert (built is None) != (error is None), (built, error)
    if error is not None:
        assert isinstance(error, str) and len(error.split()) >= 2, error
        return None, error
    if kind == "pretrain":
        assert built["input_ids"][0] == tok.bos_token_id and len(built["input_ids"]) <= MAX_LENGTH
    elif kind == "sft":
        assert len(built["input_ids"]) == len(built["loss_mask"]) <= MAX_LENGTH and any(built["loss_mask"])
    elif kind == "dpo":
        for side in ("chosen", "rejected"):
            assert len(built[f"{side}_ids"]) == len(built[f"{side}_mask"]) <= MAX_LENGTH
            assert any(built[f"{side}_mask"])
    else:  # what RLAIFDataset.__getitem__ does with it, and Arrow must be able to store it as UTF-8
        assert built["prompt"].endswith("<|im_start|>assistant\n")
        built["prompt"].encode(), built["extras"].encode()
        item = dict(prompt=built["prompt"], **json.loads(built["extras"]))
        assert isinstance(item["conversation"], list) and item["conversation"][-1]["role"] in ("user", "tool")
    return built, None


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "rlaif"])
@ROWS
@given(data=st.data())
def test_row_builders_load_or_explain_every_row(kind, data):
    tok = tokenizer()
    row = data.draw(any_row(kind), label="row")
    build(kind, row, tok)


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "rlaif"])
@settings(ROWS, max_examples=150)
@given(data=st.data())
def test_valid_rows_load(kind, data):
    tok = tokenizer()
    row = data.draw(VALID[kind], label="row")
    built, error = build(kind, row, tok)
    assert built is not None or error == CUT_OFF, error


@ROWS
@given(messages=JSON | st.lists(JSON | st.dictionaries(st.sampled_from(FIELDS), REPLACEMENT, max_size=4), max_size=4)
       | mutated(conversation("answer").map(lambda c: {"m": c[0]})).map(lambda r: r.get("m")),
       role=st.sampled_from(sorted(ROLES)) | JSON)
def test_message_checks_return_a_verdict(messages, role):
    """normalise_messages and validate_* return their verdict for any value; what they pass, the template renders."""
    normalised, tools, error = normalise_messages(messages)
    assert error is None or isinstance(error, str)
    for verdict in [validate_messages(messages), validate_messages(normalised)] + [
            validate_tool_calls(m.get("tool_calls") if isinstance(m, dict) else m, role)
            for m in (messages if isinstance(messages, list) else [])]:
        assert verdict is None or (isinstance(verdict, str) and verdict), verdict
    checked, tools, error = read_conversation({"conversations": messages})
    if error is None:
        render(tokenizer(), checked, tools)


def check_agent_row(row, tok):
    """What AgentRLDataset keeps is what train_agent needs: messages the template renders, tools with a
    function name (the reward reads them), gt strings."""
    assert set(row) == {"messages", "tools", "gt"}
    assert row["messages"][-1]["role"] == "user"
    assert all(isinstance(t["function"]["name"], str) for t in row["tools"])
    assert all(isinstance(g, str) for g in row["gt"])
    tok.apply_chat_template(row["messages"], tools=row["tools"] or None, tokenize=False, add_generation_prompt=True)


@ROWS
@given(data=st.data())
def test_agent_rows_parse_or_raise_a_value_error(data):
    tok = tokenizer()
    row = data.draw(any_row("agent") | VALID["agent"], label="row")
    try:
        parsed = AgentRLDataset.parse(json.dumps(row))
    except ValueError as error:
        assert len(str(error).split()) >= 2
        return
    check_agent_row(parsed, tok)


@settings(ROWS, max_examples=150)
@given(row=VALID["agent"])
def test_valid_agent_rows_parse(row):
    tok = tokenizer()
    check_agent_row(AgentRLDataset.parse(json.dumps(row, ensure_ascii=False)), tok)


# --------------------------------------------------------------------------------------------
# The loaders, one generated file per example
# --------------------------------------------------------------------------------------------

def write(folder, generated):
    path = os.path.join(folder, "data.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for _, line in generated))
    return path


def check_reason(message):
    """A bad line's report says what is wrong in words, not an exception's repr or a bare 'None'."""
    assert len(message.split()) >= 3 and "cannot render" not in message, message


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "rlaif"])
@FILES
@given(data=st.data())
def test_loaders_load_or_report_every_line(kind, data):
    tok = tokenizer()
    generated = data.draw(st.lists(lines(kind), min_size=20, max_size=50), label="lines")
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, generated)
        # what each line must give: the row function's verdict on it (bad bytes are bad whatever it says)
        expected = []
        for number, (label, line) in enumerate(generated, 1):
            if label == "bad":
                expected.append("bad")
                continue
            [verdict] = lm_dataset._parse_batch({"text": [line]}, [number - 1], kind, tok, MAX_LENGTH, path)["error"]
            status = {"": "row", "blank": "blank", CUT_OFF: "cut off"}.get(verdict, "bad")
            assert label != "valid" or status in ("row", "cut off"), (line, verdict)
            assert label != "blank" or status == "blank"
            expected.append(status)
        bad = [n for n, status in enumerate(expected, 1) if status == "bad"]
        cache = os.path.join(folder, "cache")
        if bad:
            with pytest.raises(DataError) as err:
                LOADERS[kind](path, tok, MAX_LENGTH, on_bad_line="error", cache_dir=cache)
            message = str(err.value)
            assert message.startswith(f"{path} line {bad[0]}: "), message
            assert (f"(and {len(bad) - 1} more bad lines)" in message) == (len(bad) > 1), message
            check_reason(message.split(": ", 1)[1])
        if "row" not in expected:
            with pytest.raises(DataError, match=f"no usable rows in {path} \\({len(bad)} bad lines, "
                                                f"{expected.count('blank')} blank lines\\)"):
                LOADERS[kind](path, tok, MAX_LENGTH, on_bad_line="skip", cache_dir=cache)
            return
        loaded = LOADERS[kind](path, tok, MAX_LENGTH, on_bad_line="skip", cache_dir=cache)
        report = loaded.report
        assert (report["rows"], report["skipped"], report["blank_lines"], report["cut_off"]) == (
            expected.count("row"), len(bad), expected.count("blank"), expected.count("cut off"))
        assert len(loaded) == report["rows"]
        assert [e.split(": ", 1)[0] for e in report["first_errors"]] == [f"{path} line {n}" for n in bad[:5]]
        for e in report["first_errors"]:
            check_reason(e.split(": ", 1)[1])
        for i in range(len(loaded)):  # every row reads back
            item = loaded[i]
            assert item.get("input_ids", item.get("chosen_input_ids", item.get("prompt"))) is not None


@FILES
@given(generated=st.lists(lines("agent"), min_size=20, max_size=50))
def test_the_agent_loader_loads_or_reports_every_line(generated):
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, generated)
        expected = []
        for label, line in generated:
            if label == "bad" or label == "blank":
                expected.append(label)
                continue
            if not line.strip():
                expected.append("blank")
                continue
            try:
                AgentRLDataset.parse(line)
                expected.append("row")
            except ValueError:
                assert label != "valid", line
                expected.append("bad")
        bad = [n for n, status in enumerate(expected, 1) if status == "bad"]
        if bad:
            with pytest.raises(DataError) as err:
                AgentRLDataset(path)
            assert str(err.value).startswith(f"{path}:{bad[0]}: "), str(err.value)
            check_reason(str(err.value).split(": ", 1)[1])
        if "row" not in expected:
            with pytest.raises(DataError, match="no agentic RL rows"):
                AgentRLDataset(path, on_bad_line="skip")
            return
        loaded = AgentRLDataset(path, on_bad_line="skip")
        assert (len(loaded), loaded.skipped) == (expected.count("row"), len(bad))
        for i in range(len(loaded)):
            check_agent_row(loaded[i], tok)


# --------------------------------------------------------------------------------------------
# What the generated lines found, pinned (each made a reader raise, or report the wrong thing, before)
# --------------------------------------------------------------------------------------------

GOOD = {"pretrain": '{"text": "好"}', "sft": json.dumps({"conversations": [{"role": "user", "content": "q"},
                                                                          {"role": "assistant", "content": "a"}]}),
        "rlaif": json.dumps({"conversations": [{"role": "user", "content": "q"}]}),
        "agent": json.dumps({"conversations": [{"role": "user", "content": "q"}], "gt": ["a"]})}
USER, CALLS = '{"role": "user", "content": "q"}', '{"role": "assistant", "content": "", "tool_calls": '


@pytest.mark.parametrize("kind, line, reason", [
    ("pretrain", b'{"text": "\xff"}', "not valid UTF-8 text (an undecodable byte, or a NUL, at column 11)"),
    ("agent", b'{"conversations": [\xc3]}', "not valid UTF-8 text"),
    ("pretrain", b"[" * 10000, "JSON that Python cannot read (nested too deeply)"),
    ("agent", b"[" * 10000, "JSON that Python cannot read (nested too deeply)"),
    ("pretrain", b'{"text": ' + b"1" * 5000 + b"}", "JSON that Python cannot read (Exceeds the limit (4300 digits)"),
    ("pretrain", b"null", "expected a JSON object, got null"),
    ("rlaif", b'{"conversations": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate"),
    ("pretrain", b'{"text": "\\udfff"}', "lone UTF-16 surrogate"),
    ("sft", b'{"conversations": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r'conversations[0] must be {"role": one of'),
    ("sft", f'{{"conversations": [{USER}, {CALLS}"{"[" * 5000}"}}]}}'.encode(),
     "conversations[1].tool_calls is a string but not valid JSON (nested too deeply)"),
    ("sft", b'{"conversations": [{"role": "system", "content": "", "tools": "[1]"}, ' + USER.encode()
     + b', {"role": "assistant", "content": "a"}]}',
     "conversations[0].tools must be a list of tool schemas"),
    ("sft", b'{"conversations": [' + USER.encode() + b', {"role": "assistant", "content": "a"}], "tools": "abc"}',
     '"tools" is a string but not valid JSON'),
    ("sft", b'{"conversations": [' + USER.encode() + b', {"role": "assistant", "content": 5, '
            b'"reasoning_content": "r"}]}', "conversations[1] must be"),
    ("sft", b'{"conversations": [' + USER.encode() + b', {"role": "assistant", "content": "a", '
            b'"reasoning_content": 5}]}', "conversations[1].reasoning_content must be a string, got int"),
    ("rlaif", b'{"conversations": [' + USER.encode() + b'], "prompt": "x"}', "rename this row's \"prompt\""),
    ("sft", b'{"conversations": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "conversations[0] must be"),
    ("agent", b'{"conversations": [{"role": "user", "content": []}], "gt": []}', "conversations[0] must be"),
    ("agent", b'{"conversations": [' + USER.encode() + b'], "gt": [], "tools": [{"function": "f"}]}',
     '"tools" must be a list of {"type": "function", "function": {"name": string'),
])
def test_found_defects_are_bad_lines(tmp_path, kind, line, reason):
    """Each line, after a good one: a DataError naming file:2 and the reason, or skipped and counted."""
    path = str(tmp_path / "data.jsonl")
    with open(path, "wb") as f:
        f.write(GOOD[kind].encode() + b"\n" + line + b"\n")
    if kind == "agent":
        with pytest.raises(DataError) as err:
            AgentRLDataset(path)
        assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value), str(err.value)
        assert AgentRLDataset(path, on_bad_line="skip").skipped == 1
        return
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as err:
        LOADERS[kind](path, tokenizer(), MAX_LENGTH, cache_dir=cache)
    assert str(err.value).startswith(f"{path} line 2: ") and reason in str(err.value), str(err.value)
    data = LOADERS[kind](path, tokenizer(), MAX_LENGTH, on_bad_line="skip", cache_dir=cache)
    assert (len(data), data.report["skipped"]) == (1, 1)


def test_tools_given_as_a_json_string_on_the_row_reach_the_prompt(tmp_path):
    """A row-level "tools" JSON string (minimind-3's form) was handed to the template as a string before."""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    row = {"conversations": [{"role": "user", "content": "q"}], "tools": json.dumps(tools)}
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps(row) + "\n")
    item = RLAIFDataset(str(path), tokenizer(), 512, cache_dir=str(tmp_path / "cache"))[0]
    assert '{"type": "function", "function": {"name": "calculator", "parameters": {}}}' in item["prompt"]
    assert item["tools"] == tools


def test_agent_rows_keep_tool_calls_the_template_renders(tmp_path):
    """An earlier assistant turn's tool_calls as a JSON string (minimind-3's form) reached the rollout's template as
    a string before ('str object' has no attribute 'name' at the first rollout); now it is read like SFT's."""
    call = {"name": "calculator", "arguments": {"expression": "1+1"}}
    row = {"conversations": [{"role": "user", "content": "1+1?"},
                             {"role": "assistant", "content": "", "tool_calls": json.dumps(call)},
                             {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"},
                             {"role": "user", "content": "2+2?"}], "gt": ["4"]}
    parsed = AgentRLDataset.parse(json.dumps(row))
    assert parsed["messages"][1]["tool_calls"] == [call]
    check_agent_row(parsed, tokenizer())
