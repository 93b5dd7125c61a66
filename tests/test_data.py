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


def test_pretrain_truncation_adds_bos_eos(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "短文本"}, {"text": "长" * 500}])
    data = PretrainDataset(path, tok, max_length=32, cache_dir=cache)
    short, long = data[0]["input_ids"], data[1]["input_ids"]
    assert short[0] == tok.bos_token_id and short[-1] == tok.eos_token_id
    assert tok.decode(short[1:-1]) == "短文本"
    assert long.shape == (32,) and long[0] == tok.bos_token_id
    assert torch.equal(data[0]["labels"], short)


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
    assert "1 rows left out because no answer token fits in max_length=32" in capsys.readouterr().out


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
