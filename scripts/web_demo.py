"""MiniMind web chat (Streamlit).

    streamlit run scripts/web_demo.py
    MINIMIND_MODEL_PATHS=/data/MiniMind2:/data/pretrain_768.pth streamlit run scripts/web_demo.py
    MINIMIND_MODEL_PATHS=minimind-3-pytorch/full_sft_768.pth MINIMIND_TOKENIZER_DIR=minimind-3 streamlit run scripts/web_demo.py

The sidebar offers every native weight (out/{weight}_{hidden}[_moe].pth) and transformers folder found
in out/ and out/demo/, the paths in $MINIMIND_MODEL_PATHS (separated by ':'), any path typed in, or an
OpenAI-compatible API (scripts/serve_openai_api.py or any other). Answers stream; a reasoning model's
<think>…</think> part is shown folded above the answer. What the user types is shown as plain text.
With "Tools" on, the model is offered the tools of inference/tools.py; each call it makes is run, shown folded
with its result, and answered again (at most TOOL_ROUNDS calls per question).
"""
import json
import os
import sys

import streamlit as st
from openai import OpenAI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from common.chat import opened_think, split_reply
from inference.chat_core import fit_prompt, load_chat_model, stream_reply, tool_turn
from inference.paths import REPO_ROOT, find_local_models, newest_chat_model
from inference.tools import TOOLS

MAX_SEQ_LEN = 8192  # prompt + answer tokens; older turns are dropped to fit
TOOL_ROUNDS = 3
LOCAL, API = "Local weight / 本地权重", "OpenAI-compatible API / 接口"


@st.cache_resource(show_spinner="Loading the model…")
def get_model(path, tokenizer_dir=None):
    # shared by every browser session; its lock serialises generation
    return load_chat_model(path, tokenizer_dir=tokenizer_dir or None)


def local_choices():
    """(weights and folders to offer, the one chosen at first): paths from $MINIMIND_MODEL_PATHS first and
    chosen; else the newest chat model in out/ or out/demo (say, the one scripts/run_demo.py just trained)."""
    extra = [p for p in os.environ.get("MINIMIND_MODEL_PATHS", "").split(os.pathsep) if p]
    found = find_local_models(os.path.join(REPO_ROOT, "out"), os.path.join(REPO_ROOT, "out", "demo"))
    return list(dict.fromkeys(extra + found)), 0 if extra else newest_chat_model(found)


def shown(path):
    return os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) else path


def show_reply(text):
    """An assistant reply: reasoning folded in an expander, the answer as Markdown (HTML stays escaped)."""
    reasoning, answer, _ = split_reply(text, tools=False)
    if reasoning is not None:
        with st.expander("Thinking / 思考过程", expanded=False):
            st.text(reasoning)
    st.markdown(answer)


def show_tool_call(call, result):
    with st.expander(f"🔧 {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})", expanded=False):
        st.code(result, language="json")


def show(message):
    if message["role"] == "tool":
        return  # shown with the call it answers
    with st.chat_message(message["role"]):
        if message.get("tool_calls"):
            for call, result in zip(message["tool_calls"], message["results"]):
                show_tool_call(call["function"], result)
        elif message["role"] == "user":
            st.text(message["content"])  # plain text: never rendered as Markdown or HTML
        else:
            show_reply(message["content"])


def local_stream(path, messages, settings, tools=None, thinking=None, tokenizer_dir=None):
    chat = get_model(path, tokenizer_dir)
    prompt_ids, _ = fit_prompt(chat.tokenizer, messages, MAX_SEQ_LEN - settings["max_tokens"], tools, thinking)
    yield opened_think(chat.tokenizer, prompt_ids)  # a prompt that opened <think>: the reply is read after it
    with chat.lock:
        for event in stream_reply(chat, prompt_ids, **settings):
            yield event["delta"]


def api_stream(base_url, api_key, model, messages, settings, tools=None, open_thinking=None):
    """The reply as text in the model's own layout: reasoning_content inside <think> tags, tool calls as
    <tool_call> blocks, so the page reads both sources the same way."""
    client = OpenAI(base_url=base_url, api_key=api_key or "none")
    model = model or client.models.list().data[0].id
    thinking = False  # the server sends <think> text as reasoning_content: put the tags back for show_reply
    extra = dict(tools=tools) if tools else {}
    if open_thinking is not None:
        extra["extra_body"] = {"chat_template_kwargs": {"open_thinking": open_thinking}}
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **settings, **extra):
        delta = chunk.choices[0].delta if chunk.choices else None
        for call in (delta.tool_calls or []) if delta else []:
            arguments = json.loads(call.function.arguments or "{}")
            yield ("</think>" if thinking else "") + "<tool_call>" + json.dumps(
                {"name": call.function.name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"
            thinking = False
        reasoning = (delta.model_extra or {}).get("reasoning_content") if delta else None
        if reasoning:
            yield reasoning if thinking else "<think>" + reasoning
            thinking = True
        if delta and delta.content:
            yield ("</think>" if thinking else "") + delta.content
            thinking = False


def main():
    """The page: Streamlit runs this script top to bottom again on every interaction."""
    st.set_page_config(page_title="MiniMind", page_icon="🤖")
    st.session_state.setdefault("messages", [])

    with st.sidebar:
        st.header("MiniMind")
        source = st.radio("Model source", [LOCAL, API], key="source")
        if source == LOCAL:
            choices, first = local_choices()
            path = st.selectbox("Model", choices, key="model_path", index=first, format_func=shown)
            typed = st.text_input("…or a weight / folder path", key="typed_path", help="used instead of the choice above")
            path = typed.strip() or path
            if not path:
                st.info("No weights in out/ yet: run `python scripts/run_demo.py` or type a path.")
            tokenizer_dir = st.text_input("Tokenizer folder (empty = the model folder's own, else model/)",
                                          os.environ.get("MINIMIND_TOKENIZER_DIR", ""), key="tokenizer_dir",
                                          help="a minimind-3 .pth needs its released folder here")
        else:
            base_url = st.text_input("Base URL", "http://127.0.0.1:8998/v1", key="base_url")
            api_key = st.text_input("API key", type="password", key="api_key")
            api_model = st.text_input("Model id (empty = the first one listed)", key="api_model")
        history_length = st.slider("History messages", 0, 20, 4, step=2, key="history")
        settings = dict(temperature=st.slider("Temperature", 0.0, 1.5, 0.85, 0.05, key="temperature"),
                        top_p=st.slider("Top-p", 0.05, 1.0, 0.85, 0.05, key="top_p"),
                        max_tokens=st.slider("Max new tokens", 16, 4096, 512, 16, key="max_tokens"))
        use_tools = st.toggle("Tools: calculator, dictionary, calendar", key="tools")
        thinking = {"template default": None, "on": True, "off": False}[
            st.radio("Thinking / 思考", ["template default", "on", "off"], key="thinking", horizontal=True)]
        if st.button("Clear chat / 清空对话"):
            st.session_state.messages = []

    st.title("🤖 MiniMind")
    if source == LOCAL and path:
        st.caption(f"Model: {shown(path)}")
    for message in st.session_state.messages:
        show(message)

    question = st.chat_input("Ask MiniMind… / 给 MiniMind 发消息")
    if question:
        history = st.session_state.messages[-history_length:] if history_length else []
        messages = history + [{"role": "user", "content": question}]
        show(messages[-1])
        tools = TOOLS if use_tools else None
        bubble = {}  # the assistant message being written

        def generate(conversation):
            """Stream one reply into a new assistant message; return its text."""
            with st.chat_message("assistant"):
                bubble["placeholder"], text = st.empty(), ""
                if source == LOCAL:
                    if not path:
                        raise ValueError("choose a model in the sidebar first")
                    stream = local_stream(path, conversation, settings, tools, thinking, tokenizer_dir.strip())
                else:
                    stream = api_stream(base_url, api_key, api_model, conversation, settings, tools, thinking)
                for delta in stream:
                    text += delta
                    with bubble["placeholder"].container():
                        show_reply(text + "▌")
                with bubble["placeholder"].container():
                    show_reply(text)
            return text

        def show_calls(calls, results):  # a tool call: shown folded with its result in place of the reply's text
            with bubble["placeholder"].container():
                for call, result in zip(calls, results):
                    show_tool_call(call, result)

        try:  # the same tool loop as eval_llm.py: a call is run and the model answers again (TOOL_ROUNDS at most)
            added = tool_turn(generate, messages, tools, TOOL_ROUNDS, on_calls=show_calls)
            for i, message in enumerate(added):  # each call keeps its results, for show() to draw them again
                if message.get("tool_calls"):
                    message["results"] = [m["content"] for m in added[i + 1:i + 1 + len(message["tool_calls"])]]
            st.session_state.messages += [messages[-1]] + added
        except (Exception, SystemExit) as e:  # a bad path or an unreachable API: say so, keep the page
            st.error(f"{type(e).__name__}: {e}")


if __name__ == "__main__":  # streamlit run executes the script as __main__
    main()
