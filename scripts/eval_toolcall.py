"""Score a model's tool calls on held-out requests: is its reply a valid call, of the right tool, with the
right arguments? Or, with --interactive 1, chat with it and its tools in the terminal (MiniMind's eval_toolcall.py).

    python scripts/eval_toolcall.py --save_dir out/demo --weight full_sft --hidden_size 192
    python scripts/eval_toolcall.py --load_from MiniMind2-Small --data my_requests.jsonl --output calls.json
    python scripts/eval_toolcall.py --interactive 1 --save_dir out/demo --weight full_sft --hidden_size 192
    python scripts/eval_toolcall.py --backend api --api_base_url http://127.0.0.1:8998/v1    # any OpenAI-style server

Each row of --data (default: the demo's tools_eval.jsonl files) is {"conversations": [{"role": "user", ...}, ...],
"tools": [...], "call": {"name", "arguments"}}: the first user turn is asked with the row's tools offered, the
greedy reply is read the way the server reads it (<tool_call> JSON blocks, common/chat.py split_reply), and
its first call is compared with "call". Arguments count as right when the tool gives the same result for them
as for the expected ones (so "12*7" and "12 * 7" are both right), and that result is not an error.

Interactive mode (--interactive 1; --backend api always chats) first asks which requests to send: [0] those of
--data (their first user turn, their tools; at most --limit), or [1] requests typed one per line (an empty line or
end of input stops), offered every tool of inference/tools.py. Each reply streams as it is generated; when it calls
tools, the calls are run (calculator, dictionary, calendar) and their results sent back, until the model answers
in text or --tool_rounds rounds of calls were run. --backend local runs the model the model flags name; --backend
api asks an OpenAI-compatible server (--api_base_url, --api_key, --api_model, --stream 0|1), by default this project's
scripts/serve_openai_api.py, which returns the calls as tool_calls. The tools are inference/tools.py's (this
project's three and MiniMind's six agent tools), and with --tools package.module your own (the interface is in
inference/tools.py); interactive mode runs the built-in ones.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from inference.paths import REPO_ROOT, add_model_arguments, resolve_paths

DEMO_REQUESTS = [os.path.join(REPO_ROOT, "dataset", "demo", "tools_eval.jsonl"),
                 os.path.join(REPO_ROOT, "dataset", "demo", "cedict", "tools_eval.jsonl")]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", default=",".join(DEMO_REQUESTS), help="comma-separated JSONL files of requests")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="at most this many requests (0 = all)")
    parser.add_argument("--output", default=None, help="also write every reply and its scores as JSON")
    chat = parser.add_argument_group("interactive mode (MiniMind's eval_toolcall.py)")
    chat.add_argument("--interactive", type=int, default=0, choices=[0, 1],
                      help="1 = chat with the model and its tools instead of scoring (implied by --backend api)")
    chat.add_argument("--backend", default="local", choices=["local", "api"],
                      help="local = the model the flags above name; api = an OpenAI-compatible server")
    chat.add_argument("--api_base_url", default="http://127.0.0.1:8998/v1",
                      help="the server's base URL (default: scripts/serve_openai_api.py's)")
    chat.add_argument("--api_key", default=None, help="default: $MINIMIND_API_KEY, else 'none'")
    chat.add_argument("--api_model", default=None, help="model id (default: the first one /v1/models lists)")
    chat.add_argument("--stream", type=int, default=1, choices=[0, 1], help="api: stream the replies")
    chat.add_argument("--max_new_tokens", type=int, default=512, help="reply length limit (the scorer's is 48)")
    chat.add_argument("--temperature", type=float, default=0.85, help="0 = greedy (the scorer is always greedy)")
    chat.add_argument("--top_p", type=float, default=0.85)
    chat.add_argument("--tool_rounds", type=int, default=3, help="rounds of tool calls run per request, at most")
    chat.add_argument("--seed", type=int, default=None, help="local: seeds each reply's sampling")
    parser.add_argument("--tools", default=None,
                        help="tools of your own that the rows call: package.module (comma-separated for several) "
                             "defining TOOLS and call(name, arguments), as inference/tools.py describes")
    args = parser.parse_args(argv)
    if args.backend == "api":
        args.interactive = 1  # the scorer runs a local model: the api backend only chats
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

from common.chat import opened_think, render, split_reply
from inference.tools import BUILTIN, TOOLS, load_tools, run_tool


def read_requests(paths):
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                call = row.get("call")
                if not (isinstance(row.get("conversations"), list) and isinstance(row.get("tools"), list)
                        and isinstance(call, dict) and isinstance(call.get("name"), str)
                        and isinstance(call.get("arguments"), dict)):
                    raise SystemExit(f'{path}, line {number}: expected {{"conversations": [...], "tools": [...], '
                                     f'"call": {{"name": string, "arguments": object}}}}')
                rows.append(row)
    return rows


def score_call(text, expected, toolset=BUILTIN):
    """{valid, right_tool, right_arguments} of one reply against the expected call, its tools run by toolset."""
    _, _, calls = split_reply(text)
    valid = calls is not None
    right_tool = valid and calls[0]["name"] == expected["name"]
    result = toolset.run(expected["name"], calls[0]["arguments"]) if right_tool else None
    right_arguments = right_tool and result == toolset.run(expected["name"], expected["arguments"]) \
        and "error" not in json.loads(result)
    return dict(valid=valid, right_tool=right_tool, right_arguments=right_arguments)


def tool_call_scores(model, tokenizer, rows, batch_size=16, max_new_tokens=48, toolset=BUILTIN):
    """Per row: its kind, the greedy reply to its first user turn (its tools offered) and score_call's answers."""
    prompts = [render(tokenizer, [next(m for m in r["conversations"] if m["role"] == "user")], r["tools"],
                      generation_prompt=True) for r in rows]
    from inference.chat_core import greedy_replies
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [dict(kind=r.get("kind", r["call"]["name"]), reply=t, **score_call(t, r["call"], toolset))
            for r, t in zip(rows, replies)]


# ----------------------------------------------------------------------------------------------
# Interactive mode: a request, the model's calls run and answered, until it answers in text
# ----------------------------------------------------------------------------------------------

def run_request(reply, prompt, tools, tool_rounds=3):
    """One request through the tool loop. reply(messages, tools) -> (text, calls): the reply's text (for a call,
    what precedes it) and its calls [{"id", "name", "arguments": a JSON string or an object}] or None. Each round
    of calls is run (inference/tools.py: a bad call is an error result the model reads), printed, and sent back in
    OpenAI's layout - an assistant message with tool_calls, a tool message per call - and the model replies again,
    up to tool_rounds rounds. Returns the conversation."""
    messages = [{"role": "user", "content": prompt}]
    for round_number in range(tool_rounds + 1):
        text, calls = reply(messages, tools)
        if not calls or round_number == tool_rounds:
            messages.append({"role": "assistant", "content": text})
            return messages
        calls = [dict(call, id=call.get("id") or f"call_{round_number}_{k}") for k, call in enumerate(calls)]
        messages.append({"role": "assistant", "content": text, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": as_json(c["arguments"])}}
            for c in calls]})
        for call in calls:
            try:
                arguments = json.loads(call["arguments"]) if isinstance(call["arguments"], str) else call["arguments"]
            except ValueError:
                arguments = call["arguments"]  # not JSON: the tool answers that its arguments must be an object
            result = run_tool(call["name"], arguments)
            print(f"🔧 {call['name']}({as_json(arguments)}) -> {result}", flush=True)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return messages


def as_json(arguments):
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def local_reply(chat, args):
    """reply() for run_request from a loaded ChatModel: the conversation rendered with its tools, the reply
    streamed token by token (inference/chat_core.py stream_reply) and read as the server reads it."""
    from inference.chat_core import stream_reply

    def reply(messages, tools):
        ids = chat.tokenizer(render(chat.tokenizer, messages, tools, generation_prompt=True),
                             add_special_tokens=False).input_ids
        text = opened_think(chat.tokenizer, ids)  # a prompt that opened <think>: the reply starts inside it
        print("🤖: " + text, end="", flush=True)
        for event in stream_reply(chat, ids, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed):
            print(event["delta"], end="", flush=True)
            text += event["delta"]
        print(flush=True)
        _, content, calls = split_reply(text)
        return (content, calls) if calls else (text, None)  # a call's text: what precedes it, as a server returns
    return reply


def api_reply(client, model, args):
    """reply() for run_request from an OpenAI-compatible server: tool_calls as it returns them (streamed deltas
    put together by index), else the <tool_call> blocks of the text (a server that does not parse them)."""
    def reply(messages, tools):
        settings = dict(model=model, messages=messages, tools=tools, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_new_tokens)
        print("🤖: ", end="", flush=True)
        if args.stream:
            text, calls, thinking = "", {}, False
            for chunk in client.chat.completions.create(stream=True, **settings):
                delta = chunk.choices[0].delta if chunk.choices else None
                if delta is None:
                    continue
                reasoning = (delta.model_extra or {}).get("reasoning_content")
                if reasoning:  # shown after 💭, not sent back
                    print(reasoning if thinking else f"💭 {reasoning}", end="", flush=True)
                    thinking = True
                if delta.content:
                    print(("\n🤖: " if thinking else "") + delta.content, end="", flush=True)
                    text, thinking = text + delta.content, False
                for part in delta.tool_calls or []:
                    call = calls.setdefault(part.index if part.index is not None else len(calls),
                                            {"id": "", "name": "", "arguments": ""})
                    call["id"] += part.id or ""
                    if part.function is not None:
                        call["name"] += part.function.name or ""
                        call["arguments"] += part.function.arguments or ""
            calls = [calls[k] for k in sorted(calls)]
        else:
            message = client.chat.completions.create(**settings).choices[0].message
            reasoning, text = (message.model_extra or {}).get("reasoning_content"), message.content or ""
            print((f"💭 {reasoning}\n🤖: " if reasoning else "") + text, end="")
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for c in message.tool_calls or []]
        print(flush=True)
        if not calls:  # a server that leaves the calls in the text
            _, content, parsed = split_reply(text)
            if parsed:
                return content, parsed
        return text, calls or None
    return reply


def requests_to_ask(args):
    """(prompt, tools) pairs: [0] the --data requests (first user turn, the row's tools), [1] typed ones."""
    try:
        choice = input("[0] the --data requests / 自动测试   [1] type your own / 手动输入\n").strip()
    except EOFError:
        return
    if choice == "0":
        rows = read_requests(data_paths(args))[:args.limit or None]
        for row in rows:
            prompt = next(m for m in row["conversations"] if m["role"] == "user")["content"]
            print(f"📦 tools: {[t['function']['name'] for t in row['tools']]}\n👶: {prompt}", flush=True)
            yield prompt, row["tools"]
        return
    if choice != "1":
        raise SystemExit(f"expected 0 or 1, got {choice!r}")
    while True:
        try:
            prompt = input("👶: ").strip()
        except EOFError:
            return
        if not prompt:
            return
        yield prompt, TOOLS


def interactive(args):
    if args.backend == "api":
        from openai import OpenAI
        api_key = args.api_key or os.environ.get("MINIMIND_API_KEY") or "none"  # the client needs one, even unused
        client = OpenAI(base_url=args.api_base_url, api_key=api_key)
        model = args.api_model or client.models.list().data[0].id
        print(f"asking {model} at {args.api_base_url}", flush=True)
        reply = api_reply(client, model, args)
    else:
        from inference.chat_core import load_chat_model
        path, lora_path = resolve_paths(args)
        chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                               args.tokenizer_dir)
        print(f"loaded {chat.name} on {chat.device}", flush=True)
        reply = local_reply(chat, args)
    for prompt, tools in requests_to_ask(args):
        run_request(reply, prompt, tools, args.tool_rounds)
        print("-" * 50, flush=True)


def data_paths(args):
    paths = [p for p in args.data.split(",") if p]
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"{path} does not exist")
    return paths


def main(args):
    if args.interactive:
        return interactive(args)
    rows = read_requests(data_paths(args))[:args.limit or None]
    toolset = load_tools(args.tools)
    from inference.chat_core import load_chat_model
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)
    scores = tool_call_scores(chat.model, chat.tokenizer, rows, args.batch_size, toolset=toolset)
    kinds = sorted({s["kind"] for s in scores})
    print(f"{'requests':24s} {'n':>5s} {'valid call':>11s} {'right tool':>11s} {'right arguments':>16s}")
    for kind in kinds + ["all"]:
        group = [s for s in scores if kind in ("all", s["kind"])]
        rates = [100 * sum(s[key] for s in group) / len(group) for key in ("valid", "right_tool", "right_arguments")]
        print(f"{kind:24s} {len(group):5d} {rates[0]:10.1f}% {rates[1]:10.1f}% {rates[2]:15.1f}%")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"model": chat.name, "scores": scores}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(args)
