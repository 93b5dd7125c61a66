"""The chat format every part shares (the data, the inference code, the scripts): how a conversation is rendered by
the chat template (render), the thinking switch (thinking_kwargs, has_thinking_switch), and how a reply is read: its
think block (split_thinking, final_reply, opened_think) and its <tool_call> blocks (parse_tool_calls, split_reply).
Only json and re here, so the dataset code imports it cheaply.

    text = render(tokenizer, messages, tools, thinking=True, generation_prompt=True)
    reasoning, content, calls = split_reply(reply)
"""
import json
import re

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
ANSWER_TAGS = ("<answer>", "</answer>")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def thinking_kwargs(thinking):
    """The chat-template switches for thinking on (True) / off (False) / the template's default (None). Both names
    are passed: this project's template reads enable_thinking (false = an empty think block), minimind-3's reads
    open_thinking (true = the reply starts inside <think>, else an empty think block); each ignores the other."""
    return {} if thinking is None else {"enable_thinking": thinking, "open_thinking": thinking}


def render(tokenizer, messages, tools=None, thinking=None, generation_prompt=False):
    """The chat template's text for the conversation (tools: OpenAI-layout tool schemas; none or [] = no tools),
    ending in the assistant's generation prompt when generation_prompt. thinking True / False sets both switches
    (this project's template reads enable_thinking, minimind-3's open_thinking); None passes neither (the
    template's default)."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt, **thinking_kwargs(thinking))


def opened_think(tokenizer, prompt_ids):
    """"<think>\n" when the prompt ends inside an open think block (minimind-3's template with open_thinking): the
    reply then holds only the reasoning's rest and "</think>", and this is what goes before it to read it whole."""
    tail = tokenizer.decode(prompt_ids[-4:])
    return THINK + "\n" if tail.rstrip().endswith(THINK) else ""


def has_thinking_switch(tokenizer):
    """Whether the chat template renders a generation prompt differently with thinking on: minimind-3's opens
    <think> there; this project's writes the same prompt either way (its only switch, enable_thinking=false, writes
    an empty think block, which the rollouts leave out), so a thinking share would change nothing."""
    probe = [{"role": "user", "content": "1+1?"}]
    thinking_on = render(tokenizer, probe, thinking=True, generation_prompt=True)
    return thinking_on != render(tokenizer, probe, generation_prompt=True)  # None = off, as the rollouts render it


def held_back(text, tags):
    """text without a trailing piece that could still grow into one of the tags."""
    for cut in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-cut:]) for t in tags):
            return text[:-cut]
    return text


def parse_tool_calls(text):
    """The calls in text made only of <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (and
    whitespace): [{"name", "arguments" (a dict)}], or None when anything in it is not such a call."""
    calls = []
    for match in TOOL_CALL_BLOCK.finditer(text):
        try:
            call = json.loads(match.group(1))
        except (ValueError, RecursionError):
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append({"name": call["name"], "arguments": arguments})
    return calls if calls and not TOOL_CALL_BLOCK.sub("", text).strip() else None


def split_thinking(text):
    """A final (complete) reply's think block and the rest: (reasoning or None, rest). When the reply starts
    (after whitespace) with <think>, reasoning is what follows up to the first </think>, stripped, and rest is what
    comes after that; a think block never closed is all reasoning (rest ""); a reply without one is (None, text)."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK):
        return None, text
    inside = stripped[len(THINK):]
    close = inside.find(END_THINK)
    if close < 0:
        return inside.strip(), ""
    return inside[:close].strip(), inside[close + len(END_THINK):]


def final_reply(turn, opened=False):
    """What a turn says after its thinking: the rest after its think block (split_thinking), "" when the block is
    never closed. opened: the prompt already opened the <think> block, so the turn starts inside it."""
    return split_thinking((THINK if opened else "") + turn)[1]


def split_reply(text, final=True, tools=True):
    """A reply's parts as an OpenAI message shows them: (reasoning or None, content, tool calls or None).

    reasoning: the <think>...</think> at its start; content: the rest up to the first <tool_call>, without
    <answer> tags; tool calls: the <tool_call> blocks, when every one is valid JSON with a name and object
    arguments (else they stay in the content as text). While streaming (final=False), a tail that could
    still become a tag is held back, so each part only grows as text arrives. tools=False: <tool_call> is text."""
    stripped = text.lstrip()
    if not final and stripped.startswith(THINK) and END_THINK not in stripped:  # still thinking
        return held_back(stripped[len(THINK):], [END_THINK]).strip(), "", None
    if not final and not stripped.startswith(THINK) and THINK.startswith(stripped):  # perhaps the start of <think>
        return None, "", None
    reasoning, rest = split_thinking(text)
    start = rest.find(CALL) if tools else -1
    content, calls_text = (rest[:start], rest[start:]) if start >= 0 else (rest, "")
    calls = parse_tool_calls(calls_text) if final and calls_text else None
    if final and calls_text and calls is None:
        content = rest  # malformed calls are returned as the text the model wrote
    if not final and not calls_text:
        content = held_back(content, ANSWER_TAGS + ((CALL,) if tools else ()))
    for tag in ANSWER_TAGS:
        content = content.replace(tag, "")
    return reasoning, content.strip(), calls
