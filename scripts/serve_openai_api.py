"""An OpenAI-compatible chat server for a trained MiniMind (Flask).

    python scripts/serve_openai_api.py --weight full_sft                    # out/full_sft_512.pth
    python scripts/serve_openai_api.py --weight full_sft --lora_weight lora_identity
    python scripts/serve_openai_api.py --load_from MiniMind2-Small          # a transformers folder
    python scripts/serve_openai_api.py --load_from out/full_sft_64.pth      # any .pth, size read off it

Endpoints: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stream, stop, seed,
tools, tool_choice, chat_template_kwargs; streaming answers are server-sent events ending in
`data: [DONE]`) and GET /v1/models.

Tools: `tools` are rendered by the chat template; a reply made of <tool_call>{"name", "arguments"}</tool_call>
blocks comes back as `tool_calls` with finish_reason "tool_calls" (streamed as tool-call deltas); a malformed
call comes back as the text the model wrote. tool_choice "none" hides the tools, "required" or a named function
starts the reply with the call for the model to complete. Assistant messages with tool_calls and "tool" messages
carry the results back. A leading <think>...</think> is returned as `reasoning_content` (also when the prompt
opened the think block), and an assistant message's `reasoning_content` goes back into the conversation.
Thinking: `open_thinking` or `enable_thinking` (true / false), top-level or in `chat_template_kwargs`; false asks
for a reply without reasoning, true lets it reason (minimind-3's template then opens the think block).

Binds 127.0.0.1:8998 unless --host / --port say otherwise; --api_key makes every request need
`Authorization: Bearer KEY`. Bodies over --max_body_mb get 413, JSON nested deeper than 64 levels 400.
The prompt is fitted to --max_seq_len - max_tokens tokens by dropping the oldest turns. Concurrent requests
are batched (inference/batching.py): up to --max_batch of them share each decoding step, a new one joins at the
next token and a finished one leaves at once; each keeps its own sampling settings, seed and stop strings.
"""
import argparse
import hmac
import json
import os
import sys
import threading
import time
import uuid
from contextlib import closing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from common.cli import HelpFormatter, show_defaults
from inference.paths import add_model_arguments, resolve_paths


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--max_seq_len", type=int, default=8192, help="prompt + completion tokens per request")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (use --api_key)")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--max_body_mb", type=float, default=4, help="larger request bodies get 413")
    parser.add_argument("--max_batch", type=int, default=16,
                        help="requests decoded together (more wait for a free row); 1 = one at a time")
    # The key's default is read after parsing, so that --help never prints a key from the environment.
    parser.add_argument("--api_key", default=None,
                        help="require 'Authorization: Bearer KEY'; when not given, $MINIMIND_API_KEY if set, else no key")
    args = show_defaults(parser).parse_args(argv)
    args.api_key = args.api_key or os.environ.get("MINIMIND_API_KEY")
    if args.max_batch < 1:
        parser.error(f"--max_batch must be at least 1 (1 = one request at a time), got {args.max_batch}")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from inference.batching import Batcher
from inference.chat_core import PromptTooLong, fit_prompt, load_chat_model, opened_think, split_reply, thinking_kwargs


DEFAULT_MAX_TOKENS = 1024
ROLES = ("system", "user", "assistant", "tool")
MAX_JSON_DEPTH = 64  # deeper bodies are refused before anything walks them


class BadRequest(ValueError):
    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message, type_="invalid_request_error", param=None, code=None):
    """OpenAI's error shape, which its clients parse into exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def json_depth(value):
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion to exhaust)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_body(raw):
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    except ValueError:
        raise BadRequest("the request body is not valid JSON (send Content-Type: application/json)")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    return body


def text_content(message, i, required=True):
    """A message's content as one string: a string, or the content-parts form with text parts only."""
    content = message.get("content")
    if content is None and not required:
        return None
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
    return content


def check_tool_calls(calls, i):
    """An assistant message's tool_calls as the template renders them; arguments must be a JSON object."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"{where} must be a non-empty list", where)
    checked = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"{where}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                             f"{where}[{j}]")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise BadRequest(f"{where}[{j}].function.arguments must be a JSON object (as a string)",
                             f"{where}[{j}].function.arguments")
        checked.append({"id": call.get("id"), "type": "function",
                        "function": {"name": function["name"], "arguments": parsed}})
    return checked


def check_tools(body):
    """(tools for the template or None, forced reply start): tools and tool_choice checked."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"] for t in tools):
        raise BadRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                         "\"description\", \"parameters\"}}", "tools")
    names = [t["function"]["name"] for t in tools]
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise BadRequest("tool_choice 'required' needs 'tools'", "tool_choice")
        if choice == "none" or not tools:
            return None, ""
        # "required": the reply starts as a call, the model writes which one
        return tools, '<tool_call>\n{"name": "' if choice == "required" else ""
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise BadRequest(f"'tool_choice' must be 'none', 'auto', 'required' or "
                         f"{{\"type\": \"function\", \"function\": {{\"name\": one of {names}}}}}", "tool_choice")
    return tools, '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


THINKING_SWITCHES = ("open_thinking", "enable_thinking")


def thinking_switch(body):
    """True / False / None (not asked) from open_thinking or enable_thinking, top-level or in chat_template_kwargs
    (minimind-3's clients send the first, Qwen-style ones the second; they mean the same)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - set(THINKING_SWITCHES):
        raise BadRequest("'chat_template_kwargs' takes {\"open_thinking\" or \"enable_thinking\": true or false}",
                         "chat_template_kwargs")
    given = {}
    for where, name in [(body, n) for n in THINKING_SWITCHES] + [(kwargs, n) for n in THINKING_SWITCHES]:
        if name in where:
            field = name if where is body else f"chat_template_kwargs.{name}"
            if not isinstance(where[name], bool):
                raise BadRequest(f"'{field}' must be true or false", field)
            given[field] = where[name]
    if len(set(given.values())) > 1:
        raise BadRequest(f"the thinking switches disagree: {given}", next(iter(given)))
    return next(iter(given.values()), None)


def parse_request(body, max_seq_len):
    """Check a chat-completions body; return its settings or raise BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        role = message["role"]
        if role == "assistant" and message.get("tool_calls") is not None:
            checked.append({"role": role, "content": text_content(message, i, required=False) or "",
                            "tool_calls": check_tool_calls(message["tool_calls"], i)})
        else:
            checked.append({"role": role, "content": text_content(message, i)})
        reasoning = message.get("reasoning_content") if role == "assistant" else None
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise BadRequest(f"messages[{i}].reasoning_content must be a string", f"messages[{i}].reasoning_content")
            # the layout both templates give it: minimind-3's reads it back out of the content, ours keeps it there
            checked[-1]["content"] = f"<think>\n{reasoning}\n</think>\n\n{checked[-1]['content']}"
    messages = checked
    if messages[-1]["role"] not in ("user", "tool"):
        raise BadRequest("the last message must come from the user or a tool", "messages")
    tools, prefix = check_tools(body)
    template_kwargs = thinking_kwargs(thinking_switch(body))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    length_field = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    return dict(messages=messages, tools=tools, prefix=prefix, template_kwargs=template_kwargs, stop=stop,
                stream=stream,
                max_tokens=number(body, length_field, min(DEFAULT_MAX_TOKENS, max_seq_len // 2), 1, max_seq_len - 1,
                                  integer=True),
                temperature=number(body, "temperature", 0.85, 0, 2),
                top_p=number(body, "top_p", 0.85, 1e-6, 1),
                seed=number(body, "seed", None, 0, 2 ** 63 - 1, integer=True))


def openai_tool_calls(calls):
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def create_app(chat, api_key=None, max_seq_len=8192, max_body_mb=4, max_batch=16, batcher_thread=True):
    """The Flask app; app.batcher runs the model (in its own thread, or, with batcher_thread=False, wherever
    the caller runs app.batcher.run_forever())."""
    app = Flask(__name__)
    app.batcher = batcher = Batcher(chat, max_batch, start_thread=batcher_thread)
    app.config["MAX_CONTENT_LENGTH"] = int(max_body_mb * 2 ** 20)  # werkzeug answers 413 past it
    expected_authorization = f"Bearer {api_key}".encode() if api_key else None

    @app.errorhandler(BadRequest)
    def bad_request(e):
        return jsonify(error_body(str(e), param=e.param, code=e.code)), 400

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405, 413 ... in OpenAI's shape too
        return jsonify(error_body(e.description, type_="invalid_request_error" if e.code < 500 else "server_error",
                                  code=e.name.lower().replace(" ", "_"))), e.code

    @app.errorhandler(Exception)
    def server_error(e):  # a failure inside generation: logged, and reported in OpenAI's shape
        app.logger.exception("request failed")
        return jsonify(error_body(f"internal error: {type(e).__name__}: {e}", type_="server_error")), 500

    @app.before_request
    def check_key():
        # compare_digest takes as long whatever the first differing byte, so timing tells nothing of the key
        given = request.headers.get("Authorization", "").encode()
        if expected_authorization and not hmac.compare_digest(given, expected_authorization):
            return jsonify(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")), 401

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                    "owned_by": "minimind"}]})

    @app.post("/v1/chat/completions")
    def chat_completions():
        req = parse_request(parse_body(request.get_data()), max_seq_len)
        try:
            prompt_ids, _ = fit_prompt(chat.tokenizer, req["messages"], max_seq_len - req["max_tokens"],
                                       req["tools"], req["template_kwargs"], req["prefix"])
        except PromptTooLong as e:
            raise BadRequest(f"{e}: shorten it or lower max_tokens (context is {max_seq_len} tokens)",
                             "messages", "context_length_exceeded")
        # what the reply is read after: the prompt's open <think> (minimind-3 with thinking on) and the forced start
        read_after = opened_think(chat.tokenizer, prompt_ids) + req["prefix"]
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        settings = dict(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                        stop=req["stop"], seed=req["seed"])
        tools = req["tools"] is not None

        def usage(completion_tokens):
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        if not req["stream"]:
            events = list(batcher.stream(prompt_ids, **settings))
            # the forced start of the reply (tool_choice) is part of what the model said
            reasoning, content, calls = split_reply(read_after + "".join(e["delta"] for e in events), tools=tools)
            message = {"role": "assistant", "content": content or (None if calls else "")}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = openai_tool_calls(calls)
            return jsonify({"id": reply_id, "object": "chat.completion", "created": created, "model": chat.name,
                            "choices": [{"index": 0, "message": message,
                                         "finish_reason": "tool_calls" if calls else events[-1]["finish_reason"]}],
                            "usage": usage(events[-1]["completion_tokens"])})

        def chunk(delta, finish_reason=None, **extra):
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": chat.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events():
            # A client that goes away closes this generator, and closing the reply's stream takes its
            # request out of the batch at the next token.
            text, sent_reasoning, sent_content = read_after, "", ""
            with closing(batcher.stream(prompt_ids, **settings)) as reply:
                yield chunk({"role": "assistant", "content": ""})
                for event in reply:
                    text += event["delta"]
                    final = "finish_reason" in event
                    # each part only grows as text arrives, so what is new is what follows the part already sent
                    reasoning, content, calls = split_reply(text, final=final, tools=tools)
                    if reasoning and len(reasoning) > len(sent_reasoning):
                        yield chunk({"reasoning_content": reasoning[len(sent_reasoning):]})
                        sent_reasoning = reasoning
                    if len(content) > len(sent_content):
                        yield chunk({"content": content[len(sent_content):]})
                        sent_content = content
                    if final:
                        for index, call in enumerate(openai_tool_calls(calls or [])):
                            yield chunk({"tool_calls": [dict(call, index=index)]})
                        yield chunk({}, "tool_calls" if calls else event["finish_reason"],
                                    usage=usage(event["completion_tokens"]))
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main(args):
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)
    print(f"serving {chat.name} ({os.path.relpath(path)}{' + ' + os.path.relpath(lora_path) if lora_path else ''}) on "
          f"http://{args.host}:{args.port}/v1 ({chat.device})", flush=True)
    app = create_app(chat, args.api_key, args.max_seq_len, args.max_body_mb, args.max_batch, batcher_thread=False)
    server = make_server(args.host, args.port, app, threaded=True)  # binds now, so a busy port fails here
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    try:
        app.batcher.run_forever()  # decoding in the thread that loaded the model (see Batcher)
    except KeyboardInterrupt:
        print("stopped", flush=True)


if __name__ == "__main__":
    main(args)
