"""The tools a MiniMind chat can call, none of which needs a network: an arithmetic calculator (parsed, never
eval'd), a dictionary over the bundled CC-CEDICT entries, and a calendar. Each takes a dict of arguments and
returns a JSON string, which goes back to the model as the tool message.

    from inference.tools import TOOLS, run_tool
    client.chat.completions.create(..., tools=TOOLS)
    run_tool("calculator", {"expression": "12*7"})        # '{"result": 84}'
"""
import ast
import concurrent.futures
import datetime
import json
import operator
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICTIONARY_PATH = os.path.join(REPO_ROOT, "dataset", "demo", "cedict", "entries.jsonl")

# Short descriptions: every tool's JSON goes into the system prompt of every request that offers it.
TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "arithmetic: + - * / ** ( )",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "dictionary", "description": "Chinese word -> pinyin, English",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}},
    {"type": "function", "function": {
        "name": "calendar", "description": "weekday of a date (YYYY-MM-DD), or of days later",
        "parameters": {"type": "object", "properties": {"date": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["date"]}}},
]

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
             ast.UAdd: operator.pos, ast.USub: operator.neg}
# What people type for the same operators
SPELLINGS = {"×": "*", "÷": "/", "（": "(", "）": ")", "^": "**", "，": "", ",": "", "＋": "+", "－": "-"}
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]


MAX_MAGNITUDE = 10 ** 30     # the calculator's bound on every value, intermediate ones included
MAX_RESULT_CHARS = 2048      # a tool's answer longer than this is cut (the model reads it in its context)
TOOL_TIMEOUT_S = 5.0         # a tool that has not answered by then gives an error result


class ToolError(ValueError):
    pass


def calculate(expression):
    """The value of an arithmetic expression, walked node by node over a syntax tree of numbers and the
    operators above (names, calls and everything else refused; exponents and sizes bounded)."""
    if not isinstance(expression, str) or not expression.strip() or len(expression) > 200:
        raise ToolError("expression must be a non-empty string of at most 200 characters")
    for spelled, canonical in SPELLINGS.items():
        expression = expression.replace(spelled, canonical)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte (Python 3.11)
        raise ToolError(f"not an arithmetic expression: {expression!r}")

    def checked(number):
        """Every value on the way is a finite real number of at most 10^30: a complex power, an overflow to inf
        or a nan would otherwise reach later operators (a TypeError) or the JSON answer (which cannot hold them)."""
        if isinstance(number, complex):
            raise ToolError("an intermediate result is not a real number")
        if not abs(number) <= MAX_MAGNITUDE:  # also catches inf and nan
            raise ToolError("result too large" if number == number else "an intermediate result is not a number")
        return number

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return checked(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10 ** 6):
                raise ToolError("exponent too large (at most 64, on a base of at most 10^6)")
            try:
                return checked(OPERATORS[type(node.op)](left, right))
            except ZeroDivisionError:
                raise ToolError("division by zero")
            except OverflowError:  # a float power past 1.8e308, e.g. 999999.0 ** 64
                raise ToolError("result too large")
        raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")

    try:
        result = value(tree.body)
    except RecursionError:  # 200 characters cannot nest this deep, but a parser change must not end a run
        raise ToolError("the expression nests too deeply")
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return round(result, 10) if isinstance(result, float) else result


_dictionary = None


def use_dictionary(entries):
    """Make the dictionary tool look words up in these CC-CEDICT entries ({simplified, pinyin, senses})."""
    global _dictionary
    _dictionary = {}
    for entry in entries:
        _dictionary.setdefault(entry["simplified"], entry)


def dictionary_entries():
    """{word: entry}, by default from the bundled entries (read on first use)."""
    if _dictionary is None:
        with open(DICTIONARY_PATH, encoding="utf-8") as f:
            use_dictionary(json.loads(line) for line in f)
    return _dictionary


def look_up(word):
    if not isinstance(word, str) or not word.strip():
        raise ToolError("word must be a non-empty string")
    entry = dictionary_entries().get(word.strip())
    if entry is None:
        raise ToolError(f"{word} is not in the dictionary")
    return {"word": entry["simplified"], "pinyin": entry["pinyin"], "english": entry["senses"]}


def calendar(date, days=0):
    try:
        day = datetime.date.fromisoformat(date)
    except (TypeError, ValueError):
        raise ToolError(f"date must be YYYY-MM-DD, got {date!r}")
    if isinstance(days, bool) or not isinstance(days, int) or abs(days) > 100_000:
        raise ToolError("days must be an integer of at most 100000")
    try:
        day += datetime.timedelta(days=days)
    except OverflowError:
        raise ToolError("the date is out of range")
    return {"date": day.isoformat(), "weekday": day.strftime("%A"), "weekday_zh": WEEKDAYS_ZH[day.weekday()]}


def call_tool(name, arguments):
    """A tool's answer as a dict; a bad call raises ToolError."""
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    if name == "calculator":
        return {"result": calculate(arguments.get("expression"))}
    if name == "dictionary":
        return look_up(arguments.get("word"))
    if name == "calendar":
        return calendar(arguments.get("date"), arguments.get("days", 0))
    raise ToolError(f"no tool named {str(name)[:64]!r} (tools: {', '.join(t['function']['name'] for t in TOOLS)})")


# Calls run in worker threads so that a slow one can be given up on; a thread cannot be killed, so the tools
# themselves stay bounded (the calculator's sizes, dictionary and calendar look-ups) and the pool has a few spares.
_workers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")


def run_tool(name, arguments, timeout=TOOL_TIMEOUT_S, max_chars=MAX_RESULT_CHARS):
    """A tool's answer as a JSON string of at most max_chars characters, never an exception: a bad call, a tool
    that fails in any way or takes longer than `timeout` seconds gives {"error": why}, which goes back to the
    model as the tool's answer (and the agent reward counts as an invalid call). A longer answer is replaced
    by {"error": ..., "partial": its start} so that it stays valid JSON."""
    try:
        result = _workers.submit(call_tool, name, arguments).result(timeout=timeout)
    except ToolError as e:
        result = {"error": str(e)}
    except concurrent.futures.TimeoutError:
        result = {"error": f"the tool did not answer within {timeout:g} s"}
    except Exception as e:  # noqa: BLE001 - any failure of a tool is an answer the model sees, not the end of a run
        result = {"error": f"the tool failed: {type(e).__name__}: {str(e)[:200]}"}
    text = json.dumps(result, ensure_ascii=False)
    if len(text) > max_chars:
        note = f"the answer is longer than {max_chars} characters; its start:"
        text = json.dumps({"error": note, "partial": text[:max_chars // 2]}, ensure_ascii=False)
        text = text if len(text) <= max_chars else json.dumps({"error": note.removesuffix("; its start:")})
    return text


def is_error(result):
    """True when a tool's answer (run_tool's JSON string) reports an error, or is not such an answer at all."""
    try:
        answer = json.loads(result)
    except (TypeError, ValueError, RecursionError):
        return True
    return not isinstance(answer, dict) or "error" in answer
