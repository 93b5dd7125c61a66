"""The project's tokenizer: special ids, single-token tags, the ChatML template, lossless round trips."""
import importlib.util
import json
import os
import re

import pytest
from transformers import AutoTokenizer

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(REPO_ROOT, "scripts", "train_tokenizer.py"))
train_tokenizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tokenizer)

MODEL_DIR = os.path.join(REPO_ROOT, "model")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_special_ids_and_vocabulary(tok):
    assert len(tok) == 6400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.unk_token == "<|endoftext|>"


@pytest.mark.parametrize("tag, tag_id", list(zip(train_tokenizer.TAG_TOKENS, range(3, 9))))
def test_reasoning_and_tool_tags_are_single_tokens(tok, tag, tag_id):
    assert tok(f"前文{tag}后文", add_special_tokens=False).input_ids.count(tag_id) == 1
    assert tok(tag).input_ids == [tag_id]
    # non-special: they survive skip_special_tokens, unlike <|im_end|>
    assert tok.decode([tag_id, 2], skip_special_tokens=True) == tag


def test_calling_the_tokenizer_adds_no_special_tokens(tok):
    ids = tok("你好，world").input_ids
    assert 0 not in ids and 1 not in ids and 2 not in ids


SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


@pytest.mark.parametrize("messages, kwargs, expected", [
    ([{"role": "user", "content": "你好"}], {},
     SYSTEM + "<|im_start|>user\n你好<|im_end|>\n"),
    ([{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "hi"}], {},
     "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"),
    ([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], {},
     SYSTEM + "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"),
    ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True},
     SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True, "enable_thinking": False},
     SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
])
def test_chat_template_renders_exactly(tok, messages, kwargs, expected):
    assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_chat_template_with_tools_and_tool_calls(tok):
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
                {"role": "tool", "content": "3"},
                {"role": "assistant", "content": "3"}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tools[0], ensure_ascii=False) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n1+2?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n")
    assert text == expected
    # an explicit system prompt replaces the default one in the tools block
    with_system = tok.apply_chat_template([{"role": "system", "content": "S"}] + messages[:1], tools=tools, tokenize=False)
    assert with_system.startswith("<|im_start|>system\nS\n\n# Tools")


@pytest.mark.parametrize("text", [
    "中华人民共和国成立于1949年。白日依山尽，黄河入海流。",
    "The quick brown fox jumps over the lazy dog's back — twice!",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 with zero-width joiners",
    "def square(x):\n\treturn x ** 2  # comment\n\n\n    indented   spaces",
    "rare: 𠀀𪚥龘 \u0301e\u0300 ﷺ ∮ ℵ₀ \x00 control",
    "<think>\n推理\n</think>\n<answer>\n42\n</answer>",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert all(0 <= i < 6400 for i in ids)


def test_compresses_held_out_text():
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    report = train_tokenizer.held_out_report(tokenizer)
    chinese, english = [float(x) for x in re.findall(r"(\d+\.\d+) \(", report)]
    assert chinese > 1.0 and english > 2.5, report


def test_committed_tokenizer_is_what_the_script_trains_on_the_demo_corpus():
    paths = [os.path.join(REPO_ROOT, p) for p in train_tokenizer.DEMO_CORPUS]
    trained = json.loads(train_tokenizer.train(paths).to_str())
    committed = json.load(open(os.path.join(MODEL_DIR, "tokenizer.json"), encoding="utf-8"))
    assert trained["model"]["vocab"] == committed["model"]["vocab"]
    assert trained["model"]["merges"] == committed["model"]["merges"]
    config = json.load(open(os.path.join(MODEL_DIR, "tokenizer_config.json"), encoding="utf-8"))
    assert config == train_tokenizer.tokenizer_config()


def test_training_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": "白日依山尽，黄河入海流。" * 3}, {"text": "hello world, hello tokenizer"},
            {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>嗯</think>好"}]}]
    corpus.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer.train([str(corpus)], vocab_size=300)
    assert tokenizer.get_vocab_size() <= 300
    assert [tokenizer.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]] == [0, 1, 2, 3]
    assert tokenizer.decode(tokenizer.encode("白日依山尽😀").ids) == "白日依山尽😀"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2"):
        train_tokenizer.train([str(bad)], vocab_size=300)
