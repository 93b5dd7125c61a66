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

Rollout endpoints, for the RL stages' --rollout_engine sglang / vllm (trainer/rl/engines.py) and for anyone
who wants token ids in and out: POST /generate (SGLang's native form: input_ids, sampling_params - one object, or
a list of one per prompt - and return_logprob; ids and each token's log-prob under the distribution it was sampled
from), POST /v1/completions (vLLM's OpenAI-compatible form: token-id or text prompts, logprobs,
return_tokens_as_token_ids, return_token_ids), and new weights from a folder - POST /update_weights_from_disk
(SGLang) or /collective_rpc reload_weights (vLLM) - only when --weight_update_root names the folder they may come
from (the Llama / Qwen3 export of the same model; code in the folder is never run). repetition_penalty,
presence_penalty, frequency_penalty and min_p are not implemented: both endpoints take them at their neutral values
(1, 0, 0, 0), as the RL trainer sends them, and refuse others.

Binds 127.0.0.1:8998 unless --host / --port say otherwise; --api_key makes every request need
`Authorization: Bearer KEY`. Bodies over --max_body_mb get 413, JSON nested deeper than 64 levels 400.
The prompt is fitted to --max_seq_len - max_tokens tokens by dropping the oldest turns. Concurrent requests
are batched (inference/batching.py): up to --max_batch of them share each decoding step, a new one joins at the
next token and a finished one leaves at once; each keeps its own sampling settings, seed and stop strings.
"""
import argparse
import hmac
import itertools
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
    parser.add_argument("--weight_update_root", default=None,
                        help="allow /update_weights_from_disk and /collective_rpc reload_weights from folders under "
                             "this one (RL weight syncs); off when not given")
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
from common.chat import opened_think, split_reply
from inference.chat_core import PromptTooLong, fit_prompt, load_chat_model


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


def number(body, name, default, low, high, integer=False, where=""):
    """body[name] checked (where: what holds body, for the error's field name, e.g. "sampling_params.")."""
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{where}{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}",
                         where + name)
    if not low <= value <= high:
        raise BadRequest(f"'{where}{name}' must be between {low} and {high}, got {value}", where + name)
    return value


def temperature(body, default, where=""):
    """A float (transformers' warper refuses an int such as 1); under 1e-6 it is greedy (0), as in SGLang: logits
    divided by a smaller one overflow to inf and sampling would fail."""
    value = float(number(body, "temperature", default, 0, 2, where=where))
    return value if value >= 1e-6 else 0.0


def json_depth(value):
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion to exhaust)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def lone_surrogate(value):
    """Where (e.g. messages[0].content) a parsed JSON value holds a string with a lone UTF-16 surrogate, or None:
    "\\ud800" is valid JSON but no text, which the tokenizer and the file system refuse."""
    try:  # the usual case at C speed; the walk below only finds where
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    pending = [(value, "")]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the request body"
        elif isinstance(item, dict):
            pending.extend((k, where) for k in item)
            pending.extend((v, f"{where}.{k}" if where else k) for k, v in item.items())
        elif isinstance(item, list):
            pending.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def parse_body(raw):
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    except ValueError:
        raise BadRequest("the request body is not valid JSON (send Content-Type: application/json)")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    where = lone_surrogate(body)
    if where:
        raise BadRequest(f"'{where}' holds a lone UTF-16 surrogate (such as \\ud800), which is not text", where)
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


def stop_strings(body):
    """'stop' as a list: a non-empty string or up to 4 of them."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stop


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
    thinking = thinking_switch(body)
    stop = stop_strings(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    length_field = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    return dict(messages=messages, tools=tools, prefix=prefix, thinking=thinking, stop=stop,
                stream=stream,
                max_tokens=number(body, length_field, min(DEFAULT_MAX_TOKENS, max_seq_len // 2), 1, max_seq_len - 1,
                                  integer=True),
                temperature=temperature(body, 0.85), top_p=number(body, "top_p", 0.85, 1e-6, 1),
                seed=number(body, "seed", None, 0, 2 ** 63 - 1, integer=True))


def token_ids(value, field, vocab_size, empty=False):
    """Token ids: a non-empty (or, empty=True, any) list of ints in the vocabulary."""
    if not isinstance(value, list) or not (value or empty) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                      for t in value):
        raise BadRequest(f"'{field}' must be a {'' if empty else 'non-empty '}list of token ids (integers)", field)
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"'{field}' holds token id {bad}, outside the vocabulary (0 to {vocab_size - 1})", field)
    return value


def prompt_list(value):
    """(the prompts, whether a batch was sent): a list of prompts (each a list or a string) is a batch."""
    batch = isinstance(value, list) and bool(value) and all(isinstance(v, (list, str)) for v in value)
    return (value if batch else [value]), batch


def token_prompts(value, field, tokenizer, vocab_size, max_seq_len, max_tokens, text=True):
    """(prompts as lists of token ids, whether a batch was sent) from one prompt or a list of them: token-id lists,
    or (text=True) strings, tokenised with the served tokenizer as they are (no chat template). max_tokens: the new
    tokens each prompt needs room for, one number for all or a list of one per prompt."""
    values, batch = prompt_list(value)
    prompts = []
    for i, prompt in enumerate(values):
        where = f"{field}[{i}]" if batch else field
        if isinstance(prompt, str) and text and prompt:
            prompt = tokenizer(prompt, add_special_tokens=False).input_ids
        prompts.append(token_ids(prompt, where, vocab_size))
        room = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        if len(prompt) + room > max_seq_len:
            raise BadRequest(f"'{where}' has {len(prompt)} tokens: with {room} new ones that passes the "
                             f"context of {max_seq_len} tokens", where, "context_length_exceeded")
    return prompts, batch


def top_k(params, where=""):
    """top_k, with -1 or 0 (both engines' "off") as 0."""
    return max(number(params, "top_k", -1, -1, 2 ** 30, integer=True, where=where), 0)


# Sampling settings this server does not implement, accepted at their neutral values: the RL trainer sends them so
# that an engine's generation_config.json cannot change its sampling.
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}


def neutral_only(params, where=""):
    """A 400 naming the first of NEUTRAL that params set to another value (a bool is no number here)."""
    for name, neutral in NEUTRAL.items():
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or value != neutral):
            raise BadRequest(f"'{where}{name}' other than {neutral} is not supported here, got {json.dumps(value)}",
                             where + name)


SGLANG_SAMPLING = ("temperature", "max_new_tokens", "top_p", "top_k", "stop_token_ids", "skip_special_tokens",
                   "no_stop_trim", "ignore_eos", "sampling_seed", *NEUTRAL)


def generate_settings(params, max_seq_len, vocab_size, where="sampling_params"):
    """SGLang's sampling_params as the batcher's settings (its defaults: 128 new tokens, temperature 1, no top-p /
    top-k; a temperature under 1e-6 is greedy). where: the field's name, e.g. sampling_params[1] in a list."""
    if not isinstance(params, dict):
        raise BadRequest(f"'{where}' must be an object", where)
    unknown = sorted(set(params) - set(SGLANG_SAMPLING))
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {unknown}; this server takes {list(SGLANG_SAMPLING)}", where)
    where += "."
    if params.get("ignore_eos"):
        raise BadRequest(f"{where}ignore_eos is not supported here", where + "ignore_eos")
    neutral_only(params, where)
    return dict(max_tokens=number(params, "max_new_tokens", 128, 1, max_seq_len - 1, integer=True, where=where),
                temperature=temperature(params, 1.0, where), top_p=number(params, "top_p", 1.0, 1e-6, 1, where=where),
                top_k=top_k(params, where),
                seed=number(params, "sampling_seed", None, 0, 2 ** 63 - 1, integer=True, where=where),
                stop_token_ids=token_ids(params.get("stop_token_ids") or [], where + "stop_token_ids", vocab_size,
                                         empty=True))


def completion_settings(body, max_seq_len, vocab_size):
    """vLLM's /v1/completions sampling fields as the batcher's settings (its defaults: 16 tokens, temperature 1)."""
    if body.get("stream"):
        raise BadRequest("'stream' is not supported on /v1/completions here (use /v1/chat/completions)", "stream")
    if body.get("n", 1) != 1 or body.get("echo") or body.get("best_of", 1) not in (1, None):
        raise BadRequest("only n = 1, best_of = 1 and echo = false are supported", "n")
    if body.get("logprobs") not in (None, 0):
        raise BadRequest("'logprobs' must be 0 (the sampled token's log-prob) or absent: top alternatives are not "
                         "returned here", "logprobs")
    neutral_only(body)
    return dict(max_tokens=number(body, "max_tokens", 16, 1, max_seq_len - 1, integer=True),
                temperature=temperature(body, 1.0), top_p=number(body, "top_p", 1.0, 1e-6, 1),
                top_k=top_k(body), seed=number(body, "seed", None, 0, 2 ** 63 - 1, integer=True),
                stop=stop_strings(body),
                stop_token_ids=token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab_size, empty=True))


def openai_tool_calls(calls):
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def create_app(chat, api_key=None, max_seq_len=8192, max_body_mb=4, max_batch=16, batcher_thread=True,
               weight_update_root=None):
    """The Flask app; app.batcher runs the model (in its own thread, or, with batcher_thread=False, wherever
    the caller runs app.batcher.run_forever()). weight_update_root: the folder new weights may be loaded from."""
    app = Flask(__name__)
    app.weight_version = "initial"  # SGLang's label of the weights being served
    reloading = threading.Lock()   # one weight update at a time
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
                                       req["tools"], req["thinking"], req["prefix"])
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

    def run_batch(prompts, settings):
        """Every prompt submitted at once (they decode together); each one's final event. settings: for all
        prompts, or a list of one per prompt."""
        settings = settings if isinstance(settings, list) else [settings] * len(prompts)
        requests = [batcher.submit(prompt, **each) for prompt, each in zip(prompts, settings)]
        return [list(batcher.events(r))[-1] for r in requests]

    @app.post("/generate")
    def generate():
        """SGLang's native generation: token ids in; ids, text and (return_logprob) each token's log-prob out."""
        body = parse_body(request.get_data())
        if not isinstance(body, dict) or "input_ids" not in body:
            raise BadRequest("send 'input_ids' (a list of token ids, or a list of such lists for a batch); text "
                             "prompts go to /v1/completions or /v1/chat/completions", "input_ids")
        vocab_size, params = chat.model.config.vocab_size, body.get("sampling_params")
        if isinstance(params, list):  # SGLang's per-prompt form: one object per prompt of the batch
            count = len(prompt_list(body["input_ids"])[0])
            if len(params) != count:
                raise BadRequest(f"'sampling_params' is a list of {len(params)} objects for {count} prompt(s) in "
                                 f"'input_ids': send one per prompt, or one object for all", "sampling_params")
            settings = [generate_settings(p, max_seq_len, vocab_size, f"sampling_params[{i}]")
                        for i, p in enumerate(params)]
            max_tokens = [s["max_tokens"] for s in settings]
        else:
            settings = generate_settings({} if params is None else params, max_seq_len, vocab_size)
            max_tokens = settings["max_tokens"]
        prompts, batch = token_prompts(body["input_ids"], "input_ids", chat.tokenizer, vocab_size, max_seq_len,
                                       max_tokens, text=False)
        with_logprobs = body.get("return_logprob", False)
        if not isinstance(with_logprobs, bool):
            raise BadRequest("'return_logprob' must be true or false", "return_logprob")
        answers = []
        for prompt, final in zip(prompts, run_batch(prompts, settings)):
            ids = final["token_ids"]
            finish = ({"type": "stop", "matched": ids[-1]} if final["finish_reason"] == "stop"
                      else {"type": "length", "length": len(ids)})
            meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                    "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": app.weight_version}
            if with_logprobs:  # SGLang's [logprob, token id, text] triples
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(final["logprobs"], ids)]
            answers.append({"text": chat.tokenizer.decode(ids, skip_special_tokens=True), "output_ids": ids,
                            "meta_info": meta})
        return jsonify(answers if batch else answers[0])

    @app.post("/v1/completions")
    def completions():
        """OpenAI's (and vLLM's) completions: a prompt as text or token ids, continued as it is (no chat
        template); logprobs 0 gives each sampled token's log-prob, return_token_ids the ids (vLLM's fields)."""
        body = parse_body(request.get_data())
        if not isinstance(body, dict) or "prompt" not in body:
            raise BadRequest("'prompt' is required: text, a list of token ids, or a list of either", "prompt")
        settings = completion_settings(body, max_seq_len, chat.model.config.vocab_size)
        prompts, _ = token_prompts(body["prompt"], "prompt", chat.tokenizer, chat.model.config.vocab_size,
                                   max_seq_len, settings["max_tokens"])
        as_ids = body.get("return_tokens_as_token_ids", False)
        choices, completion_tokens = [], 0
        for index, (prompt, final) in enumerate(zip(prompts, run_batch(prompts, settings))):
            ids = final["token_ids"]
            completion_tokens += len(ids)
            choice = {"index": index, "text": chat.tokenizer.decode(ids, skip_special_tokens=True),
                      "finish_reason": final["finish_reason"], "stop_reason": None, "logprobs": None}
            if body.get("logprobs") is not None:
                tokens = [f"token_id:{t}" if as_ids else chat.tokenizer.decode([t]) for t in ids]
                offsets = [0, *itertools.accumulate(len(x) for x in tokens)][:-1]  # where each token starts
                choice["logprobs"] = {"tokens": tokens, "token_logprobs": final["logprobs"],
                                      "top_logprobs": [{t: lp} for t, lp in zip(tokens, final["logprobs"])],
                                      "text_offset": offsets}
            if body.get("return_token_ids"):
                choice.update(prompt_token_ids=prompt, token_ids=ids)
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        return jsonify({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                        "model": chat.name, "choices": choices,
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}})

    def reload_weights(path, field):
        """Serve the weights of the model folder `path` (under weight_update_root, same tokenizer) from the next
        request on; the requests already running finish on the old ones."""
        if not weight_update_root:
            return 403, "weight updates are off: start the server with --weight_update_root FOLDER"
        if not isinstance(path, str) or not path or "\0" in path:  # the OS refuses a NUL inside a path
            return 400, f"'{field}' must be the path of a model folder"
        root, folder = os.path.realpath(weight_update_root), os.path.realpath(path)
        if os.path.commonpath([root, folder]) != root:
            return 403, f"{path} is not under --weight_update_root {root}"
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return 400, f"{path}: not a model folder (no config.json)"
        with reloading:
            try:  # a folder it cannot load leaves the served weights as they were
                # never code from the folder: it was written by another process (the RL trainer, or anyone who can)
                new = load_chat_model(folder, device=chat.device, trust_remote_code=False)
            except (SystemExit, Exception) as e:
                return 400, f"{path}: cannot load it: {e}"
            if new.tokenizer.get_vocab() != chat.tokenizer.get_vocab():
                return 400, f"{path}: its tokenizer differs from the served model's"
            batcher.swap_model(new.model)
        return 200, f"serving the weights of {path}"

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk():
        """SGLang's weight update: {"model_path", "weight_version"} -> {"success", "message", "num_paused_requests"}."""
        body = parse_body(request.get_data())
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        status, message = reload_weights(body.get("model_path"), "model_path")
        if status == 200:
            app.weight_version = str(body.get("weight_version") or app.weight_version)
        return jsonify({"success": status == 200, "message": message, "num_paused_requests": 0}), status

    @app.post("/collective_rpc")
    def collective_rpc():
        """vLLM's development control plane, its weight reload only: {"method": "reload_weights",
        "kwargs": {"weights_path": FOLDER}} -> {"results": [null]}."""
        body = parse_body(request.get_data())
        if not isinstance(body, dict) or body.get("method") != "reload_weights":
            raise BadRequest("only {\"method\": \"reload_weights\", \"kwargs\": {\"weights_path\": FOLDER}} is "
                             "served here", "method")
        kwargs = body.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("'kwargs' must be {\"weights_path\": FOLDER}", "kwargs")
        status, message = reload_weights(kwargs.get("weights_path"), "kwargs.weights_path")
        if status != 200:
            return jsonify(error_body(message, code="reload_failed")), status
        return jsonify({"results": [None]})

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():  # vLLM's; this server keeps no cache across requests
        return jsonify({})

    return app


def main(args):
    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling,
                           args.tokenizer_dir)
    print(f"serving {chat.name} ({os.path.relpath(path)}{' + ' + os.path.relpath(lora_path) if lora_path else ''}) on "
          f"http://{args.host}:{args.port}/v1 ({chat.device})", flush=True)
    app = create_app(chat, args.api_key, args.max_seq_len, args.max_body_mb, args.max_batch, batcher_thread=False,
                     weight_update_root=args.weight_update_root)
    server = make_server(args.host, args.port, app, threaded=True)  # binds now, so a busy port fails here
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    try:
        app.batcher.run_forever()  # decoding in the thread that loaded the model (see Batcher)
    except KeyboardInterrupt:
        print("stopped", flush=True)


if __name__ == "__main__":
    main(args)
