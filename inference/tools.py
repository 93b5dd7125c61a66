"""The tools a MiniMind chat can call, none of which needs a network, and the interface for tools of your own.

This project's three (TOOLS, what the demo data teaches): an arithmetic calculator (parsed, never eval'd), a
dictionary over the bundled CC-CEDICT entries, and a calendar.
MiniMind's six (AGENT_TOOLS, the tools its agent_rl.jsonl rows offer and its gt answers come from; names and argument
schemas as in its trainer/train_agent.py): calculate_math, unit_converter, get_current_weather, get_current_time,
get_exchange_rate, translate_text. All deterministic: the calculator computes, unit_converter uses real factors,
weather, exchange rates and translations come from MiniMind's fixed tables, and the time is that of a fixed clock
(CLOCK, 2025-03-07 06:30 UTC: the instant MiniMind's time table shows; use_clock() sets another, or the real one).
Each takes a dict of arguments and returns a JSON string, which goes back to the model as the tool message.

    from inference.tools import TOOLS, run_tool
    client.chat.completions.create(..., tools=TOOLS)
    run_tool("calculator", {"expression": "12*7"})        # '{"result": 84}'
    run_tool("get_exchange_rate", {"from_currency": "USD", "to_currency": "CNY"})

Tools of your own (--tools package.module in trainer/train_agent.py and scripts/eval_toolcall.py): a module that
Python can import (in the repository root, next to the script, or on PYTHONPATH: PYTHONPATH=. for the current
directory) and that defines
    TOOLS = [{"type": "function", "function": {"name": "...", "description": "...", "parameters": {...}}}, ...]
    def call(name, arguments):  # name: one of TOOLS' names; arguments: the dict the model wrote
        return {...}            # a JSON-serialisable dict (or a str: a JSON object, or text sent as {"result": text})
call raises ValueError (or returns {"error": why}) for a bad call: the model reads {"error": why} and the agent
reward counts an invalid call; any other exception, a slow call (5 s) or a long answer (2048 characters) is an error
result too, never the end of a run. A module's tools are called by name before the built-in ones (so it may replace
one); the tools a task offers the model stay those in its data row. load_tools("a.b,c") loads modules into a ToolSet:

    toolset = load_tools("my_tools")           # built-in tools + my_tools'
    toolset.run("my_tool", {"x": 1})           # run_tool through the module's call
"""
import ast
import concurrent.futures
import datetime
import importlib
import json
import math
import operator
import os
import zoneinfo

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
SPELLINGS = {"×": "*", "÷": "/", "（": "(", "）": ")", "^": "**", "，": "", ",": "", "＋": "+", "－": "-", "−": "-"}
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]


MAX_MAGNITUDE = 10 ** 30     # the calculator's bound on every value, intermediate ones included
MAX_RESULT_CHARS = 2048      # a tool's answer longer than this is cut (the model reads it in its context)
TOOL_TIMEOUT_S = 5.0         # a tool that has not answered by then gives an error result


class ToolError(ValueError):
    pass


def calculate(expression, names=None):
    """The value of an arithmetic expression, walked node by node over a syntax tree of numbers and the
    operators above (names, calls and everything else refused; exponents and sizes bounded). names: the names an
    expression may also use, as written ("pi", "math.sqrt") -> a number, or a function of numbers (calculate_math's
    MATH_NAMES); each call's result is checked like any other value."""
    names = names or {}
    if not isinstance(expression, str) or not expression.strip() or len(expression) > 200:
        raise ToolError("expression must be a non-empty string of at most 200 characters")
    # with functions a comma separates their arguments (log(8, 2)); without, it can only be a thousands separator
    spellings = {**SPELLINGS, ",": ",", "，": ","} if names else SPELLINGS
    for spelled, canonical in spellings.items():
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
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(names.get(written(node)), float):
            return names[written(node)]
        if isinstance(node, ast.Call) and callable(names.get(written(node.func))) and not node.keywords:
            arguments = [value(argument) for argument in node.args]
            try:
                result = names[written(node.func)](*arguments)
            except (TypeError, ValueError, OverflowError) as e:  # a wrong argument count, log(0), exp(1000)
                raise ToolError(f"{written(node.func)}: {e}")
            return checked(result)
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
        also = ", the functions and constants of math (sqrt, log, pi ...)" if names else ""
        raise ToolError(f"only numbers and + - * / // % ** ( ){also} are allowed, not {type(node).__name__}")

    def written(node):
        """A name as the expression writes it: "sqrt", or "math.sqrt" (a name's attribute); None for anything else."""
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return f"{node.value.id}.{node.attr}"
        return None

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


# ----------------------------------------------------------------------------------------------------------------
# MiniMind's agent tools: the six its agent_rl.jsonl rows offer (names and argument schemas of its train_agent.py).
# Where MiniMind mocks a result (weather, time, exchange rates, translations) its fixed tables are used as they are,
# since the rows' gt answers were read off them; the calculator and unit conversions compute.
# ----------------------------------------------------------------------------------------------------------------

AGENT_TOOLS = [
    {"type": "function", "function": {
        "name": "calculate_math", "description": "计算数学表达式",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "unit_converter", "description": "单位换算",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                        "to_unit": {"type": "string"}},
                       "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "获取天气",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
    {"type": "function", "function": {
        "name": "get_current_time", "description": "获取时间",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "default": "Asia/Shanghai"}},
                       "required": []}}},
    {"type": "function", "function": {
        "name": "get_exchange_rate", "description": "查询汇率",
        "parameters": {"type": "object", "properties": {"from_currency": {"type": "string"},
                                                        "to_currency": {"type": "string"}},
                       "required": ["from_currency", "to_currency"]}}},
    {"type": "function", "function": {
        "name": "translate_text", "description": "翻译文本",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"},
                                                        "target_language": {"type": "string"}},
                       "required": ["text", "target_language"]}}},
]

# calculate_math: MiniMind evaluates the expression with the math module in scope; here the same functions and
# constants are names the safe calculator accepts, bare ("sqrt(144)", as the tool's description in its eval suggests)
# or as math.<name>.
MATH_FUNCTIONS = {name: getattr(math, name) for name in (
    "sqrt", "cbrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan", "floor", "ceil",
    "fabs", "pow", "radians", "degrees")}
MATH_NAMES = {**MATH_FUNCTIONS, "pi": math.pi, "e": math.e}
MATH_NAMES.update({f"math.{name}": value for name, value in list(MATH_NAMES.items())})


def calculate_math(expression):
    """MiniMind's calculate_math: {"result": the value as a string} (its format), computed by the safe calculator."""
    return {"result": str(calculate(expression, MATH_NAMES))}


# unit_converter. MiniMind's six pairs keep its factors (the standard six-figure ones) so that results, and the gt
# answers computed from them, agree to the digit; other pairs go through a base unit with the exact definitions.
# Temperatures use the real formulas: MiniMind's mock multiplies by 1.8 (or 0.5556) without the 32 offset.
UNIT_PAIRS = {("km", "miles"): 0.621371, ("miles", "km"): 1.60934, ("kg", "pounds"): 2.20462,
              ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048}
LENGTH_IN_M = {"km": 1000.0, "meters": 1.0, "cm": 0.01, "mm": 0.001, "miles": 1609.344, "feet": 0.3048,
               "inches": 0.0254, "yards": 0.9144}
MASS_IN_KG = {"kg": 1.0, "g": 0.001, "tonnes": 1000.0, "pounds": 0.45359237, "ounces": 0.028349523125, "jin": 0.5}
TO_CELSIUS = {"celsius": lambda v: v, "fahrenheit": lambda v: (v - 32) * 5 / 9, "kelvin": lambda v: v - 273.15}
FROM_CELSIUS = {"celsius": lambda c: c, "fahrenheit": lambda c: c * 9 / 5 + 32, "kelvin": lambda c: c + 273.15}
UNIT_SPELLINGS = {
    "km": ["kilometer", "kilometers", "kilometre", "kilometres", "公里", "千米"],
    "meters": ["m", "meter", "metre", "metres", "米"], "cm": ["centimeter", "centimeters", "厘米"],
    "mm": ["millimeter", "millimeters", "毫米"], "miles": ["mile", "mi", "英里"], "feet": ["foot", "ft", "英尺"],
    "inches": ["inch", "in", "英寸"], "yards": ["yard", "yd", "码"],
    "kg": ["kilogram", "kilograms", "kgs", "公斤", "千克"], "g": ["gram", "grams", "克"],
    "tonnes": ["tonne", "ton", "tons", "t", "吨"], "pounds": ["pound", "lb", "lbs", "磅"],
    "ounces": ["ounce", "oz", "盎司"], "jin": ["斤"],
    "celsius": ["c", "°c", "℃", "摄氏度", "摄氏"], "fahrenheit": ["f", "°f", "℉", "华氏度", "华氏"],
    "kelvin": ["k", "开尔文", "开"]}
UNITS = {spelling: unit for unit, spellings in UNIT_SPELLINGS.items() for spelling in [unit, *spellings]}


def unit_named(name):
    unit = UNITS.get(name.strip().lower()) if isinstance(name, str) else None
    if unit is None:
        raise ToolError(f"unknown unit {str(name)[:32]!r} (units: {', '.join(UNIT_SPELLINGS)})")
    return unit


def convert_units(value, from_unit, to_unit):
    """value in from_unit, in to_unit, rounded to 4 decimals (MiniMind's rounding)."""
    if isinstance(value, str):  # MiniMind reads float(value): "100" is a number too
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_MAGNITUDE:
        raise ToolError("value must be a finite number of at most 10^30")
    source, target = unit_named(from_unit), unit_named(to_unit)
    if (source, target) in UNIT_PAIRS:
        result = value * UNIT_PAIRS[source, target]
    elif source in TO_CELSIUS and target in FROM_CELSIUS:
        result = FROM_CELSIUS[target](TO_CELSIUS[source](value))
    else:
        table = next((t for t in (LENGTH_IN_M, MASS_IN_KG) if source in t and target in t), None)
        if table is None:
            raise ToolError(f"cannot convert {source} to {target}")
        result = value * table[source] / table[target]
    return round(result, 4)


# get_current_weather: MiniMind's table; a city it does not list gets its default (22°C, 晴), as there.
WEATHER = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
           "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
           "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
           "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}
DEFAULT_WEATHER = ("22°C", "晴")
# The same cities as a model may also write them, and each city's time zone (get_current_time)
CITIES = {"北京": ("Beijing", "Asia/Shanghai"), "上海": ("Shanghai", "Asia/Shanghai"),
          "广州": ("Guangzhou", "Asia/Shanghai"), "深圳": ("Shenzhen", "Asia/Shanghai"),
          "杭州": ("Hangzhou", "Asia/Shanghai"), "成都": ("Chengdu", "Asia/Shanghai"), "武汉": ("Wuhan", "Asia/Shanghai"),
          "南京": ("Nanjing", "Asia/Shanghai"), "西安": ("Xi'an", "Asia/Shanghai"),
          "重庆": ("Chongqing", "Asia/Shanghai"), "Tokyo": ("东京", "Asia/Tokyo"),
          "New York": ("纽约", "America/New_York"), "London": ("伦敦", "Europe/London"),
          "Paris": ("巴黎", "Europe/Paris"), "Sydney": ("悉尼", "Australia/Sydney")}


def place_key(name):
    """A place name as looked up: "北京市" -> "北京", "New York" -> "newyork", "Xi'an" -> "xian"."""
    return name.strip().removesuffix("市").casefold().replace("'", "").replace(" ", "")


CITY_NAMES = {place_key(spelling): city for city, (other, _) in CITIES.items() for spelling in (city, other)}


def city_named(location):
    """The table's city for a location as written ("北京", "北京市", "beijing", "newyork"), or None."""
    return CITY_NAMES.get(place_key(location))


def weather(location):
    if not isinstance(location, str) or not location.strip() or len(location) > 64:
        raise ToolError("location must be a city name (a non-empty string of at most 64 characters)")
    temperature, condition = WEATHER.get(city_named(location), DEFAULT_WEATHER)
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


# get_current_time: the time of a fixed clock, so that a task's answer never changes. MiniMind's table gives
# Asia/Shanghai 2025-03-07 14:30:00, America/New_York 01:30, Europe/London 06:30, Asia/Tokyo 15:30, Europe/Paris
# 07:30, Australia/Sydney 17:30: all one instant, 06:30 UTC, which CLOCK is; any IANA zone is converted from it.
CLOCK = datetime.datetime(2025, 3, 7, 6, 30, tzinfo=datetime.timezone.utc)
DEFAULT_TIMEZONE = "Asia/Shanghai"
_clock = CLOCK


def use_clock(moment):
    """Make get_current_time read this moment (an aware datetime), or the real clock (None)."""
    global _clock
    if moment is not None and moment.tzinfo is None:
        raise ValueError("the clock's moment needs a time zone (e.g. tzinfo=datetime.timezone.utc)")
    _clock = moment


_timezones = None


def timezone_named(name):
    """A ZoneInfo for an IANA name (in any case) or one of the table's cities; only names of the time zone
    database, so that a key is never a path into it."""
    global _timezones
    if _timezones is None:
        _timezones = {key.lower(): key for key in zoneinfo.available_timezones()}
    if not _timezones:
        raise ToolError("no time zone database on this machine (pip install tzdata)")
    city = city_named(name)
    key = CITIES[city][1] if city else _timezones.get(name.strip().lower())
    if key is None:
        raise ToolError(f"unknown time zone {name[:64]!r} (an IANA name such as Asia/Shanghai or America/New_York)")
    return zoneinfo.ZoneInfo(key)


def current_time(timezone=None):
    if timezone is not None and not isinstance(timezone, str):
        raise ToolError("timezone must be a string, e.g. Asia/Shanghai")
    zone = timezone_named(timezone or DEFAULT_TIMEZONE)  # missing or empty: the schema's default
    moment = (_clock or datetime.datetime.now(datetime.timezone.utc)).astimezone(zone)
    return {"datetime": moment.strftime("%Y-%m-%d %H:%M:%S"), "timezone": zone.key}


# get_exchange_rate: MiniMind's table; the other pairs of its six currencies follow from it (the inverse of a listed
# pair, else the cross rate through CNY, to 4 significant digits), where MiniMind's mock answers 1.0.
EXCHANGE_RATES = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
                  ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}
CURRENCY_NAMES = {"美元": "USD", "人民币": "CNY", "RMB": "CNY", "元": "CNY", "欧元": "EUR", "英镑": "GBP",
                  "日元": "JPY", "澳元": "AUD"}
CURRENCIES = sorted({code for pair in EXCHANGE_RATES for code in pair})


def currency_named(name):
    plain = name.strip() if isinstance(name, str) else ""
    code = CURRENCY_NAMES.get(plain) or CURRENCY_NAMES.get(plain.upper()) or plain.upper()
    if code not in CURRENCIES:
        raise ToolError(f"unknown currency {str(name)[:16]!r} (currencies: {', '.join(CURRENCIES)})")
    return code


def exchange_rate(from_currency, to_currency):
    source, target = currency_named(from_currency), currency_named(to_currency)

    def in_cny(code):
        if code == "CNY":
            return 1.0
        return EXCHANGE_RATES.get((code, "CNY")) or 1 / EXCHANGE_RATES[("CNY", code)]
    if (source, target) in EXCHANGE_RATES:
        rate = EXCHANGE_RATES[source, target]
    elif source == target:
        rate = 1.0
    elif (target, source) in EXCHANGE_RATES:
        rate = float(f"{1 / EXCHANGE_RATES[target, source]:.4g}")
    else:
        rate = float(f"{in_cny(source) / in_cny(target):.4g}")
    return {"from": source, "to": target, "rate": rate}


# translate_text: MiniMind's table of phrases; other text has no offline translation (MiniMind's mock would return it
# unchanged, as if translated), so it is an error.
TRANSLATIONS = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
                ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程",
                ("机器学习很有趣", "english"): "Machine learning is interesting",
                ("Happy birthday", "chinese"): "生日快乐"}
LANGUAGES = {spelling: language for language, spellings in {
    "english": ["en", "eng", "英文", "英语"], "chinese": ["zh", "zh-cn", "中文", "汉语", "简体中文"]}.items()
    for spelling in [language, *spellings]}
QUOTES = "\"'“”‘’「」《》 \n"
PHRASES = {(text.casefold(), language): translated for (text, language), translated in TRANSLATIONS.items()}


def translate(text, target_language):
    if not isinstance(text, str) or not text.strip(QUOTES) or not isinstance(target_language, str):
        raise ToolError("text and target_language must be non-empty strings")
    language = LANGUAGES.get(target_language.strip().lower(), target_language.strip().lower())
    translated = PHRASES.get((text.strip(QUOTES).rstrip("。.!！").casefold(), language))
    if translated is None:
        raise ToolError(f"no offline translation of {text[:64]!r} into {target_language[:32]!r}")
    return {"translated_text": translated}


# Every built-in tool: its name -> the function of the call's arguments that answers it (a dict)
FUNCTIONS = {
    "calculator": lambda arguments: {"result": calculate(arguments.get("expression"))},
    "dictionary": lambda arguments: look_up(arguments.get("word")),
    "calendar": lambda arguments: calendar(arguments.get("date"), arguments.get("days", 0)),
    "calculate_math": lambda arguments: calculate_math(arguments.get("expression")),
    "unit_converter": lambda arguments: {"result": convert_units(arguments.get("value"), arguments.get("from_unit"),
                                                                 arguments.get("to_unit"))},
    "get_current_weather": lambda arguments: weather(arguments.get("location")),
    "get_current_time": lambda arguments: current_time(arguments.get("timezone")),
    "get_exchange_rate": lambda arguments: exchange_rate(arguments.get("from_currency"), arguments.get("to_currency")),
    "translate_text": lambda arguments: translate(arguments.get("text"), arguments.get("target_language")),
}
BUILTIN_TOOLS = TOOLS + AGENT_TOOLS  # the schemas of every tool above


def call_tool(name, arguments):
    """A built-in tool's answer as a dict; a bad call raises ToolError."""
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    if not isinstance(name, str) or name not in FUNCTIONS:
        raise ToolError(f"no tool named {str(name)[:64]!r} (tools: {', '.join(FUNCTIONS)})")
    return FUNCTIONS[name](arguments)


# Calls run in worker threads so that a slow one can be given up on; a thread cannot be killed, so the tools
# themselves stay bounded (the calculator's sizes, dictionary and calendar look-ups) and the pool has a few spares.
_workers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")


def run_tool(name, arguments, timeout=TOOL_TIMEOUT_S, max_chars=MAX_RESULT_CHARS, call=None):
    """A tool's answer as a JSON string of at most max_chars characters, never an exception: a bad call, a tool
    that fails in any way or takes longer than `timeout` seconds gives {"error": why}, which goes back to the
    model as the tool's answer (and the agent reward counts as an invalid call). A longer answer is replaced
    by {"error": ..., "partial": its start} so that it stays valid JSON. call: what answers the call with a dict
    (default call_tool, the built-in tools; a ToolSet passes its own, plug-ins first)."""
    try:
        result = _workers.submit(call or call_tool, name, arguments).result(timeout=timeout)
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



# ----------------------------------------------------------------------------------------------------------------
# Tools of your own: --tools package.module (the interface is in this file's docstring)
# ----------------------------------------------------------------------------------------------------------------

INTERFACE = ("a tool module defines TOOLS, a list of OpenAI-style schemas {\"type\": \"function\", \"function\": "
             "{\"name\", \"description\", \"parameters\"}}, and call(name, arguments) returning a dict or a str "
             "(see inference/tools.py)")


class ToolSet:
    """The tools a run can call: the built-in ones and those of plug-in modules (load_tools), whose names come first.
    names: every tool it answers; schemas: theirs; run(name, arguments): run_tool through call."""

    def __init__(self, modules=()):
        self.modules = list(modules)
        self.plugged = {t["function"]["name"]: (m, t) for m in self.modules for t in m.TOOLS}
        self.schemas = [t for _, t in self.plugged.values()] + \
            [t for t in BUILTIN_TOOLS if t["function"]["name"] not in self.plugged]
        self.names = {t["function"]["name"] for t in self.schemas}

    def call(self, name, arguments):
        """The answer to one call as a dict; a bad call raises ToolError (what run_tool sends as {"error": why})."""
        if name not in self.plugged:
            return call_tool(name, arguments)
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        try:
            answer = self.plugged[name][0].call(name, arguments)
        except ValueError as e:  # the module's way to say the call is bad (ToolError is one too)
            raise ToolError(str(e) or type(e).__name__) from e
        if answer is None:
            raise ToolError(f"the tool {name} returned nothing")
        if isinstance(answer, str):  # a JSON object as it is, any other text as the result
            try:
                parsed = json.loads(answer)
            except ValueError:
                parsed = None
            answer = parsed if isinstance(parsed, dict) else {"result": answer}
        elif not isinstance(answer, dict):
            answer = {"result": answer}
        json.dumps(answer)  # here, in the worker: an answer JSON cannot hold is the tool's failure, not run_tool's
        return answer

    def run(self, name, arguments, **limits):
        return run_tool(name, arguments, call=self.call, **limits)


BUILTIN = ToolSet()


def load_tool_module(name):
    """The module `name` (package.module), checked against the interface; SystemExit saying what is wrong."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - ImportError, or the module failing as it runs: both end here
        raise SystemExit(f"--tools {name}: cannot import it ({type(e).__name__}: {e}); it must be importable as "
                         f"package.module (in the repository root, next to the script, or on PYTHONPATH: "
                         f"PYTHONPATH=. for the current directory), and {INTERFACE}") from None
    schemas = getattr(module, "TOOLS", None)
    if not isinstance(schemas, list) or not schemas or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            and t["function"]["name"] for t in schemas):
        raise SystemExit(f"--tools {name}: its TOOLS is missing or not a non-empty list of schemas; {INTERFACE}")
    names = [t["function"]["name"] for t in schemas]
    if len(set(names)) != len(names):
        raise SystemExit(f"--tools {name}: TOOLS names a tool twice ({', '.join(names)})")
    if not callable(getattr(module, "call", None)):
        raise SystemExit(f"--tools {name}: it has no call(name, arguments); {INTERFACE}")
    return module


def load_tools(spec=None):
    """The ToolSet of --tools (comma-separated package.module names): built-in tools and the modules'; BUILTIN
    for none."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    return ToolSet([load_tool_module(n) for n in names]) if names else BUILTIN
