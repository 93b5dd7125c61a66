"""dataset/lm_dataset.py: loss masks, packing, truncation, padding, bad input, caching."""
import json
import os

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO_ROOT
from dataset import lm_dataset
from dataset.lm_dataset import (DataError, DPODataset, PretrainDataset, RLAIFDataset, SFTDataset, load_jsonl,
                                pad_batch)

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def runs(labels):
    """Contiguous runs of positions with a label, as (start, end) pairs."""
    positions = (labels != -100).nonzero().flatten().tolist()
    out = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [tuple(r) for r in out]


def test_sft_loss_mask_covers_exactly_the_assistant_turns(tok, tmp_path, cache):
    conversation = [{"role": "system", "content": "你是助手。"},
                    {"role": "user", "content": "白日依山尽的下一句？"},
                    {"role": "assistant", "content": "黄河入海流。"},
                    {"role": "user", "content": "Who wrote it?"},
                    {"role": "assistant", "content": "Wang Zhihuan."}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": conversation}])
    row = SFTDataset(path, tok, max_length=512, cache_dir=cache)[0]
    ids, labels = row["input_ids"], row["labels"]
    text = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode(ids) == text
    spans = runs(labels)
    assert len(spans) == 2
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["黄河入海流。<|im_end|>\n", "Wang Zhihuan.<|im_end|>\n"]
    # exact positions: each run starts right after "<|im_start|>assistant\n" and labels equal the ids there
    for a, b in spans:
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")
        assert torch.equal(labels[a:b], ids[a:b])
    assert (labels[:spans[0][0]] == -100).all()  # system and user text carry no loss
    assert tok.decode(ids[spans[0][1]:spans[1][0]]) == "<|im_start|>user\nWho wrote it?<|im_end|>\n<|im_start|>assistant\n"


def test_sft_truncation_keeps_mask_consistent(tok, tmp_path, cache):
    long_answer = "很长的回答。" * 200
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "问"},
                                                                   {"role": "assistant", "content": long_answer}]}])
    row = SFTDataset(path, tok, max_length=64, cache_dir=cache)[0]
    assert row["input_ids"].shape == row["labels"].shape == (64,)
    a, b = runs(row["labels"])[0]
    assert b == 64 and torch.equal(row["labels"][a:], row["input_ids"][a:])
    assert tok.decode(row["input_ids"][a:]) in long_answer


def test_pretrain_truncation_adds_bos_eos(tok, tmp_path, cache, capsys):
    """A document longer than max_length keeps its first max_length - 2 tokens and still ends in <eos>, as in
    MiniMind's PretrainDataset; the load message counts the documents cut."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "短文本"}, {"text": "长" * 500}])
    data = PretrainDataset(path, tok, max_length=32, cache_dir=cache)
    short, long = data[0]["input_ids"], data[1]["input_ids"]
    assert short[0] == tok.bos_token_id and short[-1] == tok.eos_token_id
    assert tok.decode(short[1:-1]) == "短文本"
    assert long.shape == (32,) and long[0] == tok.bos_token_id and long[-1] == tok.eos_token_id
    assert torch.equal(long[1:-1], torch.tensor(tok("长" * 500, add_special_tokens=False)["input_ids"][:30]))
    assert torch.equal(data[0]["labels"], short)
    assert data.report["truncated"] == 1
    assert "2 rows used; 1 documents cut to max_length=32 (each still ends in <|im_end|>" in capsys.readouterr().out


def test_packed_pretraining_keeps_long_documents_whole(tok, tmp_path, cache):
    text = "白日依山尽，黄河入海流。" * 40
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": text}, {"text": "短"}])
    packed = PretrainDataset(path, tok, max_length=32, packing=True, cache_dir=cache)
    stream = torch.cat([packed[i]["input_ids"] for i in range(len(packed))])
    expected = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id,
                tok.bos_token_id, *tok("短", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert stream.tolist() == expected and packed.report["truncated"] == 0


def test_packing_keeps_every_token(tok, tmp_path, cache):
    rows = [{"text": f"第{i}篇文档。" + "内容" * (i % 37)} for i in range(300)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    plain = PretrainDataset(path, tok, max_length=4096, cache_dir=cache)
    packed = PretrainDataset(path, tok, max_length=100, packing=True, cache_dir=cache)
    stream = torch.cat([plain[i]["input_ids"] for i in range(len(plain))])
    packed_stream = torch.cat([packed[i]["input_ids"] for i in range(len(packed))])
    assert torch.equal(stream, packed_stream)  # same tokens, same order, documents separated by bos/eos
    lengths = [len(packed[i]["input_ids"]) for i in range(len(packed))]
    assert all(n == 100 for n in lengths[:-1]) and 0 < lengths[-1] <= 100
    assert (stream == tok.bos_token_id).sum() == 300 and (stream == tok.eos_token_id).sum() == 300


def test_batches_pad_only_to_the_longest_row(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": "一二三四五六七八九十"}, {"text": "abc"}])
    data = PretrainDataset(path, tok, max_length=340, cache_dir=cache)
    rows = [data[i] for i in range(3)]
    batch = pad_batch(rows, pad_id=tok.pad_token_id)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (3, width) and width < 340
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == tok.pad_token_id).all()


def test_dpo_accepts_both_layouts(tok, tmp_path, cache):
    messages = {"chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
                "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}]}
    strings = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "dpo.jsonl", [messages, strings])
    data = DPODataset(path, tok, max_length=128, cache_dir=cache)
    a, b = data[0], data[1]
    assert (int(a["index"]), int(b["index"])) == (0, 1)
    for key in a.keys() - {"index"}:
        assert torch.equal(a[key], b[key]), key
    assert tok.decode(a["chosen_input_ids"][a["chosen_labels"] != -100]) == "2<|im_end|>\n"
    assert tok.decode(a["rejected_input_ids"][a["rejected_labels"] != -100]) == "3<|im_end|>\n"


def test_rlaif_prompt_ends_with_generation_prompt_and_keeps_extras(tok, tmp_path, cache):
    row = {"conversations": [{"role": "user", "content": "3 × 4 = ?"}, {"role": "assistant", "content": ""}],
           "task": "arithmetic", "answers": ["12"]}
    data = RLAIFDataset(write_jsonl(tmp_path / "rl.jsonl", [row]), tok, max_length=128, cache_dir=cache)
    item = data[0]
    assert item["prompt"].endswith("<|im_start|>user\n3 × 4 = ?<|im_end|>\n<|im_start|>assistant\n")
    assert item["task"] == "arithmetic" and item["answers"] == ["12"]
    assert item["conversation"] == row["conversations"][:1]  # the prompt as messages, placeholder removed


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_malformed_line_names_file_and_line(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "好"}, {"text": "也好"}, '{"text": "坏', {"text": "好"}])
    with pytest.raises(DataError) as err:
        PretrainDataset(path, tok, cache_dir=cache)
    assert f"{path} line 3: not valid JSON" in str(err.value)
    data = PretrainDataset(path, tok, on_bad_line="skip", cache_dir=cache)
    assert len(data) == 3
    assert data.report["skipped"] == 1 and data.report["first_errors"][0].startswith(f"{path} line 3")


def test_wrong_fields_name_what_was_expected(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]},
                                                {"messages": []}])
    with pytest.raises(DataError, match=r'sft.jsonl line 2: "conversations" must be a non-empty list'):
        SFTDataset(path, tok, cache_dir=cache)
    path = write_jsonl(tmp_path / "p.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match=r'p.jsonl line 1: expected \{"text": string\}'):
        PretrainDataset(path, tok, cache_dir=cache)
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        PretrainDataset(path, tok, cache_dir=cache)
    path = write_jsonl(tmp_path / "role.jsonl", [{"conversations": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"conversations\[0\] must be"):
        SFTDataset(path, tok, cache_dir=cache)


@pytest.mark.parametrize("row, message", [
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected has no non-empty assistant turn"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
     "chosen has no non-empty assistant turn"),
])
def test_bad_dpo_rows(tok, tmp_path, cache, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "dpo.jsonl", [good, row])
    with pytest.raises(DataError, match=f"line 2: {message}"):
        DPODataset(path, tok, cache_dir=cache)
    data = DPODataset(path, tok, on_bad_line="skip", cache_dir=cache)
    assert len(data) == 1 and data.report["skipped"] == 1


def test_sft_row_without_assistant_turn_is_an_error(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match="no non-empty assistant turn"):
        SFTDataset(path, tok, cache_dir=cache)


@pytest.mark.parametrize("content", [None, ""])
def test_a_tool_call_only_assistant_turn_is_learned(tok, tmp_path, cache, content):
    """OpenAI-style {"content": null or "", "tool_calls": [...]}: the template renders the call inside the
    assistant turn, and that call (with its <|im_end|>) is what carries the loss."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}
    row = {"conversations": [{"role": "user", "content": "2+3?"},
                             {"role": "assistant", "content": content, "tool_calls": [call]},
                             {"role": "tool", "content": "5"}],
           "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]}
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [row]), tok, cache_dir=cache)
    item = data[0]
    learned = tok.decode(item["input_ids"][item["labels"] != -100])
    assert learned == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>\n'
    dpo = {"chosen": row["conversations"][:2],
           "rejected": [row["conversations"][0], {"role": "assistant", "content": "7"}]}
    pairs = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [dpo]), tok, cache_dir=cache)
    assert "<tool_call>" in tok.decode(pairs[0]["chosen_input_ids"][pairs[0]["chosen_labels"] != -100])


@pytest.mark.parametrize("turn, message", [
    ({"role": "assistant", "content": None}, r"conversations\[1\] must be"),
    ({"role": "assistant", "content": None, "tool_calls": 42}, '"tool_calls" must be a list of calls, got int'),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}, r"tool_calls\[0\] must be"),
    ({"role": "user", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]}, "only assistant turns"),
])
def test_bad_tool_calls_name_what_was_expected(tok, tmp_path, cache, turn, message):
    row = {"conversations": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=f"sft.jsonl line 1: .*{message}"):
        SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [row]), tok, cache_dir=cache)


CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                               "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}


def test_minimind3_sft_rows_with_json_strings_and_reasoning(tok, tmp_path, cache):
    """An sft_t2t row: tools as a JSON string on the system message, tool_calls as a JSON string of
    {name, arguments}, a tool message and reasoning_content. The schemas reach the prompt, the call and the
    reasoning (as <think>...</think>) carry the loss, and nothing is silently dropped."""
    row = {"conversations": [
        {"role": "system", "content": "", "tools": json.dumps([CALCULATOR])},
        {"role": "user", "content": "12*7?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should use the calculator.",
         "tool_calls": json.dumps({"name": "calculator", "arguments": {"expression": "12*7"}})},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": "84", "reasoning_content": "The tool says 84."}]}
    data = SFTDataset(write_jsonl(tmp_path / "sft_t2t.jsonl", [row]), tok, 1024, cache_dir=cache)
    item = data[0]
    text = tok.decode(item["input_ids"])
    learned = tok.decode(item["input_ids"][item["labels"] != -100])
    assert '"description": "evaluate arithmetic"' in text and "<tool_response>\n84\n</tool_response>" in text
    assert learned == ('<think>\nI should use the calculator.\n</think>\n\n\n<tool_call>\n{"name": "calculator", '
                       '"arguments": {"expression": "12*7"}}\n</tool_call><|im_end|>\n'
                       "<think>\nThe tool says 84.\n</think>\n\n84<|im_end|>\n")


def test_agent_rl_rows_load_for_rl(tok, tmp_path, cache):
    row = {"conversations": [{"role": "system", "content": "", "tools": json.dumps([CALCULATOR])},
                             {"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": ""}],
           "gt": ["84"]}
    data = RLAIFDataset(write_jsonl(tmp_path / "agent_rl.jsonl", [row]), tok, 1024, cache_dir=cache)
    item = data[0]
    assert "# Tools" in item["prompt"] and '"name": "calculator"' in item["prompt"]
    assert item["prompt"].endswith("<|im_start|>assistant\n")
    assert item["gt"] == ["84"] and item["tools"] == [CALCULATOR]


@pytest.mark.parametrize("turn, message", [
    ({"role": "assistant", "content": "", "tool_calls": "{not json"}, r"conversations\[1\].tool_calls is a string but not valid JSON"),
    ({"role": "user", "content": "x", "tools": "[]"}, r'conversations\[1\]: only a system message carries "tools"'),
])
def test_unreadable_minimind3_fields_are_bad_rows(tok, tmp_path, cache, turn, message):
    rows = [{"conversations": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=f"sft.jsonl line 1: {message}"):
        SFTDataset(path, tok, cache_dir=cache)
    data = SFTDataset(path, tok, on_bad_line="skip", cache_dir=cache)  # the rest of the file loads
    assert len(data) == 1 and data.report["skipped"] == 1


def test_a_row_the_template_cannot_render_is_a_bad_row(tok, tmp_path, cache, monkeypatch):
    import jinja2

    def render(tokenizer, messages, tools=None, thinking=None, generation_prompt=False):
        if messages[0]["content"] == "breaks":
            raise jinja2.exceptions.UndefinedError("'str object' has no attribute 'name'")
        return original(tokenizer, messages, tools, thinking, generation_prompt)
    original = lm_dataset.render
    monkeypatch.setattr(lm_dataset, "render", render)
    rows = [{"conversations": [{"role": "user", "content": "breaks"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match="sft.jsonl line 1: the chat template cannot render this row "
                                        "\\(UndefinedError: 'str object' has no attribute 'name'\\)"):
        SFTDataset(path, tok, cache_dir=cache)
    assert len(SFTDataset(path, tok, on_bad_line="skip", cache_dir=cache + "2")) == 1


def test_empty_and_missing_files(tok, tmp_path, cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        PretrainDataset(str(empty), tok, cache_dir=cache)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no usable rows"):
        PretrainDataset(str(blank), tok, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="check --data_path"):
        PretrainDataset(str(tmp_path / "nope.jsonl"), tok, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="python scripts/download_data.py pretrain_hq.jsonl"):
        PretrainDataset(str(tmp_path / "pretrain_hq.jsonl"), tok, cache_dir=cache)


def test_blank_lines_are_counted_not_errors(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    data = PretrainDataset(path, tok, cache_dir=cache)
    assert len(data) == 2 and data.report["blank_lines"] == 2 and data.report["skipped"] == 0


# --------------------------------------------------------------------------------------------
# Caching, several files, parallel tokenisation
# --------------------------------------------------------------------------------------------

def test_second_load_comes_from_the_cache(tok, tmp_path, cache, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"文档{i}"} for i in range(50)])
    first = PretrainDataset(path, tok, cache_dir=cache)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenisation ran again instead of using the cache")

    monkeypatch.setattr(lm_dataset, "_parse_batch", must_not_run)
    second = PretrainDataset(path, tok, cache_dir=cache)
    assert len(second) == len(first) and torch.equal(second[7]["input_ids"], first[7]["input_ids"])
    # a changed file is tokenised again
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "新的一行"}, ensure_ascii=False) + "\n")
    os.utime(path, (os.path.getmtime(path) + 5, os.path.getmtime(path) + 5))
    with pytest.raises(AssertionError, match="tokenisation ran again"):
        PretrainDataset(path, tok, cache_dir=cache)


def test_several_files_and_parallel_tokenisation_agree(tok, tmp_path, cache):
    rows = [{"text": f"第{i}行：" + "白日依山尽" * (i % 7)} for i in range(1500)]
    a = write_jsonl(tmp_path / "a.jsonl", rows[:1200])
    b = write_jsonl(tmp_path / "b.jsonl", rows[1200:])
    serial, _ = load_jsonl(f"{a},{b}", "pretrain", tok, 64, num_proc=1, cache_dir=cache)
    parallel, report = load_jsonl([a, b], "pretrain", tok, 64, num_proc=2, cache_dir=str(tmp_path / "c2"))
    assert report["rows"] == len(serial) == 1500
    assert serial["input_ids"] == parallel["input_ids"]


def test_demo_files_load_for_every_stage(tok, cache):
    demo = os.path.join(REPO_ROOT, "dataset", "demo")
    for cls, name in ((PretrainDataset, "pretrain_eval"), (SFTDataset, "sft_eval"), (DPODataset, "dpo_eval"),
                      (SFTDataset, "r1_eval"), (RLAIFDataset, "rlaif_eval"), (SFTDataset, "lora_identity")):
        data = cls(os.path.join(demo, f"{name}.jsonl"), tok, max_length=512, cache_dir=cache)
        assert len(data) > 0 and data.report["skipped"] == 0, name


def test_rows_whose_answer_lies_beyond_max_length_are_counted_not_errors(tok, tmp_path, cache, capsys):
    long_question = {"conversations": [{"role": "user", "content": "问" * 300}, {"role": "assistant", "content": "答"}]}
    short = {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [short, long_question, short]), tok, max_length=32,
                      cache_dir=cache)
    assert len(data) == 2 and data.report["cut_off"] == 1 and data.report["skipped"] == 0
    message = capsys.readouterr().out
    assert "sft.jsonl: 2 rows used; 1 rows left out because no answer token fits in max_length=32" in message
    assert "MiniMind keeps such rows, with no token to learn" in message


def test_rl_rows_with_different_extra_fields_batch_together(tok, tmp_path, cache):
    rows = [{"conversations": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": ""}],
             "answers": ["2"]},
            {"conversations": [{"role": "user", "content": "随便聊聊"}, {"role": "assistant", "content": ""}]}]
    data = RLAIFDataset(write_jsonl(tmp_path / "rl.jsonl", rows), tok, max_length=64, cache_dir=cache)
    batch = pad_batch([data[0], data[1]])
    assert batch["answers"] == [["2"], None] and len(batch["prompt"]) == 2


def test_lengths_are_token_counts(tok, cache):
    """lengths() (for --group_by_length) reads token counts from Arrow: the longer side of a DPO pair."""
    demo = os.path.join(REPO_ROOT, "dataset", "demo")
    sft = SFTDataset(os.path.join(demo, "sft_eval.jsonl"), tok, max_length=64, cache_dir=cache)
    assert sft.lengths()[:20].tolist() == [len(sft[i]["input_ids"]) for i in range(20)]
    dpo = DPODataset(os.path.join(demo, "dpo_eval.jsonl"), tok, max_length=64, cache_dir=cache)
    assert dpo.lengths()[:20].tolist() == [max(len(dpo[i]["chosen_input_ids"]), len(dpo[i]["rejected_input_ids"]))
                                           for i in range(20)]
    with pytest.raises(ValueError, match="no tokens"):
        RLAIFDataset(os.path.join(demo, "rlaif_eval.jsonl"), tok, max_length=64, cache_dir=cache).lengths()


# --------------------------------------------------------------------------------------------
# minimind-3's augmentation: the empty think block dropped, a system prompt added (seeded per row)
# --------------------------------------------------------------------------------------------

# A small template in the manner of minimind-3's: each assistant turn without a think block of its own opens with an
# empty one; a tools block goes into the system message
THINKING_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' + (messages[0].content if messages[0].role == 'system' else '') }}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- set content = message.content or '' %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + ('' if '</think>' in content else '<think>\\n\\n</think>\\n\\n') + content }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}")


@pytest.fixture(scope="module")
def thinking_tok():
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def mixed_rows(n=600):
    """Row i: i % 4 == 0 offers tools, 1 is plain, 2 has its own system message, 3 reasons (a non-empty think)."""
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}"}]
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": "", "tools": json.dumps([CALCULATOR])})
        elif i % 4 == 2:
            turns.insert(0, {"role": "system", "content": "只用一句话回答。"})
        elif i % 4 == 3:
            turns[1]["reasoning_content"] = f"想一想{i}"
        rows.append({"conversations": turns})
    return rows


def texts(data, tok):
    return [tok.decode(data[i]["input_ids"]) for i in range(len(data))]


def test_augmentation_shares_and_rules(thinking_tok, tmp_path, cache, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", mixed_rows())
    data = SFTDataset(path, thinking_tok, 256, drop_empty_think=0.8, add_system_ratio=0.2, seed=7, cache_dir=cache)
    r, decoded = data.report, texts(data, thinking_tok)
    assert len(decoded) == 600 and r["empty_think"] == 450 and r["no_system"] == 300  # rows 0-2 / rows 1 and 3 mod 4
    assert abs(r["empty_think_dropped"] / 450 - 0.8) < 0.07 and abs(r["system_added"] / 300 - 0.2) < 0.07
    added = [next((p for p in lm_dataset.SYSTEM_PROMPTS if p in text), None) for text in decoded]
    assert sum(p is not None for p in added) == r["system_added"] and len(set(added) - {None}) >= 5
    for i, (text, prompt) in enumerate(zip(decoded, added)):
        if i % 4 in (0, 2):  # tools, or a system message of its own: never a system prompt
            assert prompt is None and text.count("<|im_start|>system") == 1, text
        if i % 4 == 3:  # its think block is not empty: kept
            assert f"<|im_start|>assistant\n<think>\n想一想{i}\n</think>\n\n回答{i}" in text
    assert sum("<think>\n\n</think>" in text for text in decoded) == 450 - r["empty_think_dropped"]
    message = capsys.readouterr().out
    assert (f"sft.jsonl: 600 rows used; empty think block dropped from {r['empty_think_dropped']} of the 450 rows "
            f"that have one (--drop_empty_think 0.8); a system prompt added to {r['system_added']} of the 300 rows "
            f"without tools or a system message (--add_system_ratio 0.2)") in message


def test_augmentation_is_fixed_per_row_and_keyed_in_the_cache(thinking_tok, tmp_path, monkeypatch):
    """A row is augmented the same way in every load (a resume re-reads the same rows, even tokenised afresh), a
    changed --seed or share tokenises again, and the two shares draw independently of each other."""
    path = write_jsonl(tmp_path / "sft.jsonl", mixed_rows(200))
    load = lambda cache, **kw: texts(SFTDataset(path, thinking_tok, 256, cache_dir=str(tmp_path / cache), **{
        **dict(drop_empty_think=0.5, add_system_ratio=0.5, seed=1), **kw}), thinking_tok)
    first = load("a")
    assert load("b") == first  # tokenised again, in a fresh cache: the same rows
    other_seed = load("a", seed=2)
    assert other_seed != first
    dropped = lambda rows: [i for i, text in enumerate(rows) if i % 4 != 3 and "<think>" not in text]
    with_system = lambda rows: [i for i, text in enumerate(rows) if any(p in text for p in lm_dataset.SYSTEM_PROMPTS)]
    assert dropped(other_seed) != dropped(first) and with_system(other_seed) != with_system(first)
    more_system = load("a", add_system_ratio=0.9)
    assert dropped(more_system) == dropped(first) and set(with_system(first)) < set(with_system(more_system))
    assert load("a", drop_empty_think=0.0, add_system_ratio=0.0) == load("a", drop_empty_think=0.0,
                                                                         add_system_ratio=0.0, seed=2)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenisation ran again instead of using the cache")
    monkeypatch.setattr(lm_dataset, "_parse_batch", must_not_run)
    assert load("a") == first  # the same settings: from the cache
    with pytest.raises(AssertionError, match="tokenisation ran again"):
        load("a", drop_empty_think=0.6)


def test_a_dropped_think_block_is_not_trained(thinking_tok, tmp_path, cache):
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": turns}])
    learned = {}
    for share in (0.0, 1.0):
        row = SFTDataset(path, thinking_tok, 256, drop_empty_think=share, cache_dir=cache)[0]
        learned[share] = row["input_ids"][row["labels"] != -100]
    block = len(thinking_tok(lm_dataset.EMPTY_THINK, add_special_tokens=False)["input_ids"])
    assert thinking_tok.decode(learned[0.0]) == "<think>\n\n</think>\n\n2<|im_end|>\n<think>\n\n</think>\n\n4<|im_end|>\n"
    assert thinking_tok.decode(learned[1.0]) == "2<|im_end|>\n4<|im_end|>\n"
    assert len(learned[0.0]) - len(learned[1.0]) == 2 * block  # every turn's block, in every dropped row


def test_dpo_pairs_drop_the_block_on_both_sides_and_get_no_system_prompt(thinking_tok, tmp_path, cache, capsys):
    pairs = [{"chosen": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"好{i}"}],
              "rejected": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"坏{i}"}]}
             for i in range(300)]
    data = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", pairs), thinking_tok, 128, drop_empty_think=0.5, seed=3,
                      cache_dir=cache)
    sides = [(thinking_tok.decode(data[i]["chosen_input_ids"]), thinking_tok.decode(data[i]["rejected_input_ids"]))
             for i in range(len(data))]
    kept = [("<think>" in chosen, "<think>" in rejected) for chosen, rejected in sides]
    assert all(a == b for a, b in kept)  # one draw per pair
    assert data.report["empty_think"] == 300 and sum(not a for a, _ in kept) == data.report["empty_think_dropped"]
    assert abs(data.report["empty_think_dropped"] / 300 - 0.5) < 0.1
    assert not any("<|im_start|>system" in chosen for chosen, _ in sides)
    assert "of the 300 rows that have one (--drop_empty_think 0.5)" in capsys.readouterr().out


def test_the_message_says_when_the_template_writes_no_empty_think_block(tok, tmp_path, cache, capsys):
    rows = [{"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}]
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 64, drop_empty_think=0.8, cache_dir=cache)
    assert data.report["empty_think"] == 0
    assert "--drop_empty_think 0.8 changes nothing: this chat template writes none" in capsys.readouterr().out


def test_shares_default_per_generation():
    from trainer import train_dpo, train_full_sft
    minimind3 = train_full_sft.arguments(["--generation", "minimind-3"])
    assert (minimind3.drop_empty_think, minimind3.add_system_ratio) == (0.8, 0.2)
    assert "--drop_empty_think 0.8: the default of --generation minimind-3" in minimind3.chosen_for_you
    minimind2 = train_full_sft.arguments([])
    assert (minimind2.drop_empty_think, minimind2.add_system_ratio) == (0.0, 0.0)
    assert not any("empty_think" in note or "system_ratio" in note for note in minimind2.chosen_for_you)
    typed = train_full_sft.arguments(["--generation", "minimind-3", "--drop_empty_think", "0", "--add_system_ratio",
                                      "0.5"])
    assert (typed.drop_empty_think, typed.add_system_ratio) == (0.0, 0.5)
    dpo = train_dpo.arguments(["--generation", "minimind-3"])
    assert dpo.drop_empty_think == 0.8 and not hasattr(dpo, "add_system_ratio")
    with pytest.raises(SystemExit):
        train_full_sft.arguments(["--add_system_ratio", "1.5"])
