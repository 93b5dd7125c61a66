"""An OpenAI-compatible chat server for a trained MiniMind (Flask).

    python scripts/serve_openai_api.py --weight full_sft                    # out/full_sft_512.pth
    python scripts/serve_openai_api.py --weight full_sft --lora_weight lora_identity
    python scripts/serve_openai_api.py --load_from MiniMind2-Small          # a transformers folder
    python scripts/serve_openai_api.py --load_from out/full_sft_64.pth      # any .pth, size read off it

Endpoints: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stream, stop, seed;
streaming answers are server-sent events ending in `data: [DONE]`) and GET /v1/models.
Binds 127.0.0.1:8998 unless --host / --port say otherwise; --api_key makes every request need
`Authorization: Bearer KEY`. The prompt is fitted to --max_seq_len - max_tokens tokens by dropping
the oldest turns. One model answers one request at a time (a lock); others wait their turn.
"""
import argparse
import json
import os
import sys
import time
import uuid

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chat_core import (PromptTooLong, add_model_arguments, fit_prompt, load_chat_model, resolve_paths,  # noqa: E402
                       stream_reply)
from trainer.trainer_utils import HelpFormatter, show_defaults  # noqa: E402  (chat_core put the repo on the path)

DEFAULT_MAX_TOKENS = 1024
ROLES = ("system", "user", "assistant")


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
        content = message.get("content")
        if isinstance(content, list):  # the content-parts form: keep the text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        checked.append({"role": message["role"], "content": content})
    messages = checked
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must come from the user", "messages")
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
    return dict(messages=messages, stop=stop, stream=stream,
                max_tokens=number(body, length_field, min(DEFAULT_MAX_TOKENS, max_seq_len // 2), 1, max_seq_len - 1,
                                  integer=True),
                temperature=number(body, "temperature", 0.85, 0, 2),
                top_p=number(body, "top_p", 0.85, 1e-6, 1),
                seed=number(body, "seed", None, 0, 2 ** 63 - 1, integer=True))


def create_app(chat, api_key=None, max_seq_len=8192):
    app = Flask(__name__)

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
        if api_key and request.headers.get("Authorization", "") != f"Bearer {api_key}":
            return jsonify(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")), 401

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                    "owned_by": "minimind"}]})

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = request.get_json(silent=True)
        if body is None:
            raise BadRequest("the request body is not valid JSON (send Content-Type: application/json)")
        req = parse_request(body, max_seq_len)
        try:
            prompt_ids, _ = fit_prompt(chat.tokenizer, req["messages"], max_seq_len - req["max_tokens"])
        except PromptTooLong as e:
            raise BadRequest(f"{e}: shorten it or lower max_tokens (context is {max_seq_len} tokens)",
                             "messages", "context_length_exceeded")
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        settings = dict(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                        stop=req["stop"], seed=req["seed"])

        def usage(completion_tokens):
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        if not req["stream"]:
            with chat.lock:
                events = list(stream_reply(chat, prompt_ids, **settings))
            return jsonify({"id": reply_id, "object": "chat.completion", "created": created, "model": chat.name,
                            "choices": [{"index": 0, "finish_reason": events[-1]["finish_reason"],
                                         "message": {"role": "assistant",
                                                     "content": "".join(e["delta"] for e in events)}}],
                            "usage": usage(events[-1]["completion_tokens"])})

        def chunk(delta, finish_reason=None, **extra):
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": chat.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events():
            # The lock is held while this response streams; a client that goes away closes the
            # generator, which releases it.
            with chat.lock:
                yield chunk({"role": "assistant", "content": ""})
                for event in stream_reply(chat, prompt_ids, **settings):
                    if event["delta"]:
                        yield chunk({"content": event["delta"]})
                    if "finish_reason" in event:
                        yield chunk({}, event["finish_reason"], usage=usage(event["completion_tokens"]))
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--max_seq_len", type=int, default=8192, help="prompt + completion tokens per request")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (use --api_key)")
    parser.add_argument("--port", type=int, default=8998)
    # The key's default is read after parsing, so that --help never prints a key from the environment.
    parser.add_argument("--api_key", default=None,
                        help="require 'Authorization: Bearer KEY'; when not given, $MINIMIND_API_KEY if set, else no key")
    args = show_defaults(parser).parse_args()
    args.api_key = args.api_key or os.environ.get("MINIMIND_API_KEY")

    path, lora_path = resolve_paths(args)
    chat = load_chat_model(path, lora_path, args.lora_alpha, args.device, args.inference_rope_scaling)
    print(f"serving {chat.name} ({os.path.relpath(path)}{' + ' + os.path.relpath(lora_path) if lora_path else ''}) on "
          f"http://{args.host}:{args.port}/v1 ({chat.device})", flush=True)
    create_app(chat, args.api_key, args.max_seq_len).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
