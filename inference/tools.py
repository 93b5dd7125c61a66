"""The tools a MiniMind chat can call, none of which needs a network: an arithmetic calculator (parsed, never
eval'd), a dictionary over the bundled CC-CEDICT entries, and a calendar. Each takes a dict of arguments and
returns a JSON string, which goes back to the model as the tool message.

    from inference.tools import TOOLS, run_tool
    client.chat.completions.create(..., tools=TOOLS)
    run_tool("calculator", {"expression": "12*7"})        # '{"result": 84}'
"""
import ast
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
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}")

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10 ** 6):
                raise ToolError("exponent too large (at most 64, on a base of at most 10^6)")
            try:
                result = OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero")
            if abs(result) > 10 ** 30:
                raise ToolError("result too large")
            return result
        raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")

    result = value(tree.body)
    if isinstance(result, complex):
        raise ToolError("the result is not a real number")
    if not abs(result) <= 10 ** 30:  # also catches inf and nan, which JSON cannot carry
        raise ToolError("result too large")
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


def run_tool(name, arguments):
    """A tool's answer as a JSON string; a bad call gives {"error": why}, never an exception."""
    try:
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        if name == "calculator":
            result = {"result": calculate(arguments.get("expression"))}
        elif name == "dictionary":
            result = look_up(arguments.get("word"))
        elif name == "calendar":
            result = calendar(arguments.get("date"), arguments.get("days", 0))
        else:
            raise ToolError(f"no tool named {name!r} (tools: {', '.join(t['function']['name'] for t in TOOLS)})")
    except ToolError as e:
        result = {"error": str(e)}
    return json.dumps(result, ensure_ascii=False)
