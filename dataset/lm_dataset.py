"""Datasets for every training stage, built on the `datasets` library.

A JSONL file is read as Arrow text rows (memory-mapped, never held as Python objects), then parsed and
tokenised in parallel by `datasets.map`; the result is cached on disk, so a second run with the same
file, tokenizer and settings starts at once. Token ids are stored as uint16 (the vocabulary has 6400).

    PretrainDataset  {"text"}                    -> input_ids (cut to max_length, or packed into full rows)
    SFTDataset       {"conversations": [...]}    -> input_ids, loss_mask (assistant turns only); or packed rows
    DPODataset       {"chosen", "rejected"}      -> both sides tokenised with their loss masks
    RLAIFDataset     {"conversations", ...}      -> the prompt text ending in the generation prompt, its messages,
                                                   and every extra field (task, answers, ...)
    AgentRLDataset   {"conversations", "gt"}     -> the messages up to the request, the tools offered, gt answers
                                                   (small files: read whole, not through `datasets`)

`pad_batch` pads a batch to its longest row only. A malformed line raises an error naming the file and
line number; with on_bad_line="skip" such lines are skipped and counted instead (see `.report`). Whatever a line
holds - bytes that are not UTF-8, text that is not JSON, JSON of any shape - it is one of these two, never a
traceback (tests/test_fuzz_data.py generates such lines).

SFT and DPO rows may be augmented as minimind-3's upstream does it (Augmentation): the empty think block left out of a
share of rows, a system prompt from SYSTEM_PROMPTS put before a share of the conversations without tools. Each row's
draws are fixed by (seed, file, line), and the result is part of the cached tokenisation, so every epoch and every
resume sees the same rows; the load message counts what was done.
"""
import codecs
import hashlib
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import datasets
from jinja2 import TemplateError
from common.chat import render
from dataset.files import FILES as DOWNLOADABLE  # the full MiniMind data files, by name

ASSISTANT_START = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
ROLES = {"system", "user", "assistant", "tool"}
CACHE_VERSION = "6"  # bump when the tokenisation logic below changes
CUT_OFF = "cut off"  # a well-formed row whose answer lies beyond max_length: left out and counted
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what minimind-3's template writes before an answer without reasoning

# What a row's "notes" column records (bits), for the counts in the load message
TRUNCATED = 1       # pretraining: the document was cut to fit max_length
HAD_EMPTY_THINK = 2  # SFT / DPO: an assistant turn starts with an empty think block
DROPPED_THINK = 4   # ... and the blocks were left out of this row
NO_SYSTEM = 8       # SFT: no tools and no system message of its own, so a system prompt may be added
ADDED_SYSTEM = 16   # ... and one was

# Short, generic system prompts (this project's wording; upstream's minimind-3 list is of the same kind), one of
# which goes before a share (--add_system_ratio) of the SFT conversations that have neither tools nor a system message
SYSTEM_PROMPTS = (
    "你是一个乐于助人的AI助手。",
    "你是minimind，一个小而实用的语言模型，请认真回答用户的问题。",
    "你是一个知识渊博的助手，请给出准确、清晰的回答。",
    "你是一个耐心的AI助手，尽量帮助用户解决问题。",
    "你是minimind，请用简洁可靠的方式回答。",
    "You are a helpful and honest AI assistant.",
    "You are minimind, a small language model that does its best to help.",
    "You are a knowledgeable assistant. Answer accurately and clearly.",
    "You are a friendly AI. Read the user's question carefully before you answer.",
    "You are minimind, a compact assistant. Give useful, correct answers.",
)


@dataclass(frozen=True)
class Augmentation:
    """minimind-3's data augmentation of SFT and DPO rows (upstream's pre_processing_chat / post_processing_chat):
    drop_empty_think: the share of rows whose assistant turns open with an empty think block (EMPTY_THINK, which
        minimind-3's template writes before every answer without reasoning) that are trained without it; upstream
        0.8 (its empty_think_ratio=0.2 is the share that keeps it). One draw per row: all its turns, or none; a DPO
        pair's two sides share the draw.
    add_system_ratio: the share of SFT rows without tools and without a system message of their own that get one
        of SYSTEM_PROMPTS; upstream 0.2 (DPO rows get none, as upstream).
    seed: with the row's file and line, fixes its draws (row_draws), so a row is augmented the same way in every
        epoch, on every process and after a resume; upstream draws afresh each time a row is read."""
    drop_empty_think: float = 0.0
    add_system_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("drop_empty_think", "add_system_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share of the rows, from 0 to 1; got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return bool(self.drop_empty_think or self.add_system_ratio)

    def key(self):
        """What the cached tokenisation depends on: nothing while no row is changed (the seed then changes nothing)."""
        return (self.drop_empty_think, self.add_system_ratio, self.seed) if self.active else None

    def row_draws(self, file_number: int, index: int):
        """Three numbers in [0, 1) fixed by (seed, file, line): whether the empty think blocks go, whether a system
        prompt comes, which one. All three are always drawn, so changing one share never moves the other's rows."""
        rng = random.Random(f"minimind/{self.seed}/{file_number}/{index}")
        return rng.random(), rng.random(), rng.random()


NO_AUGMENTATION = Augmentation()


class DataError(ValueError):
    """Bad training data: the message names the file and line and what was expected."""


# Bytes that are not UTF-8 must make their line a bad line, not stop the whole file with a UnicodeDecodeError (the
# file is decoded in chunks by `datasets`, which cannot report a line). Each such byte reads as NUL: a raw NUL is
# never valid in a JSON line either, so no good line changes, and read_json_line reports the line.
BAD_BYTE = "\x00"
UTF8_ERRORS = "minimind_bad_byte"
codecs.register_error(UTF8_ERRORS, lambda err: (BAD_BYTE * (err.end - err.start), err.end))


def json_problem(err) -> str:
    """What json.loads found wrong, in words: a syntax error, or a value Python will not build."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(":")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def read_json_line(line: str):
    """One JSONL line -> (row dict, None) or (None, what is wrong with the line)."""
    if BAD_BYTE in line:
        return None, f"not valid UTF-8 text (an undecodable byte, or a NUL, at column {line.index(BAD_BYTE) + 1})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({json_problem(err)})"
    except (ValueError, RecursionError) as err:  # valid, but a number of over 4300 digits or arrays nested 1000s deep
        return None, f"JSON that Python cannot read ({json_problem(err)})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {'null' if row is None else type(row).__name__}"
    # a \ud800-\udfff escape without its pair decodes to a lone surrogate: not text (the tokenizer and Arrow refuse
    # it, far from this line); only a line with such an escape needs the (slower) check
    if "\\ud" in line or "\\uD" in line:
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): not text"
        except RecursionError:
            return None, "JSON that Python cannot read (nested too deeply)"
    return row, None


def check_file(path: str) -> None:
    if not os.path.exists(path):
        name = os.path.basename(path)
        hint = (f"; download it with: python scripts/download_data.py {name}"
                if name in DOWNLOADABLE else "; check --data_path")
        raise FileNotFoundError(f"data file {path} does not exist{hint}")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty: expected one JSON object per line")


def split_paths(paths) -> list[str]:
    """A path, a comma-separated string of paths, or a list of paths -> a list."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    return [os.path.expanduser(p) for p in paths]


# ----------------------------------------------------------------------------------------------
# Row parsing and tokenisation (run inside datasets.map, possibly in several processes)
# ----------------------------------------------------------------------------------------------

def validate_messages(messages, field="conversations"):
    """A list of {"role", "content"} dicts; an assistant turn may instead (or as well) carry OpenAI-style
    "tool_calls" (its content then may be null or ""). Returns an error string or None."""
    if not isinstance(messages, list) or not messages:
        return f'"{field}" must be a non-empty list of messages'
    for i, m in enumerate(messages):
        message = m if isinstance(m, dict) else {}
        calls, role = message.get("tool_calls"), message.get("role")
        # an assistant turn may leave its content out; the template needs every other turn's text
        content = message.get("content", "" if role == "assistant" else None)
        content_ok = isinstance(content, str) or (content is None and calls)
        if not (isinstance(m, dict) and isinstance(role, str) and role in ROLES and content_ok):  # not `[] in ROLES`
            return (f'{field}[{i}] must be {{"role": one of {sorted(ROLES)}, "content": string}} (or an assistant '
                    f'turn with "tool_calls" and "content": null), got {json.dumps(m, ensure_ascii=False)[:100]}')
        if calls is not None:
            error = validate_tool_calls(calls, role)
            if error:
                return f"{field}[{i}]: {error}"
    return None


def validate_tool_calls(calls, role):
    """OpenAI's form [{"type": "function", "function": {"name", "arguments"}}] or the bare {"name", "arguments"}."""
    if role != "assistant":
        return f'only assistant turns carry "tool_calls" (this one is a {role} turn)'
    if not isinstance(calls, list):
        return f'"tool_calls" must be a list of calls, got {type(calls).__name__}'
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), (str, dict))):
            return (f'tool_calls[{j}] must be {{"function": {{"name": string, "arguments": object or JSON string}}}}, '
                    f"got {json.dumps(call, ensure_ascii=False)[:100]}")
    return None


def read_tools(tools, where='"tools"'):
    """A conversation's tool schemas: a list of JSON objects, or that list as a JSON string (minimind-3's form).
    Returns (tools or None, error). Anything else would reach the chat template, which renders a string's
    characters or a dict's keys as tools, or fails far from the line."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except (ValueError, RecursionError) as err:
            return None, f"{where} is a string but not valid JSON ({json_problem(err)})"
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return None, (f'{where} must be a list of tool schemas ({{"type": "function", "function": {{...}}}}), '
                      f"got {json.dumps(tools, ensure_ascii=False)[:100]}")
    return tools or None, None


def normalise_messages(messages, field="conversations"):
    """minimind-3's row forms -> the ones the chat template renders. Returns (messages, tools, error):
    - a system message's "tools" (a JSON string or a list) become the conversation's tools;
    - "tool_calls" given as a JSON string (one call or a list of calls) become a list;
    - an assistant turn's "reasoning_content" goes before its content as "<think>\n...\n</think>\n\n", the layout
      minimind-3's template gives it (this project's template has no such field, so it would be lost).
    Anything else is left for validate_messages to judge."""
    if not isinstance(messages, list):
        return messages, None, None
    normalised, tools = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            normalised.append(message)
            continue
        message = dict(message)
        calls = message.get("tool_calls")
        if isinstance(calls, str):
            try:
                message["tool_calls"] = json.loads(calls) if calls.strip() else None
            except (ValueError, RecursionError) as err:  # also a number of 5000 digits, arrays 1000s deep
                return None, None, f"{field}[{i}].tool_calls is a string but not valid JSON ({json_problem(err)})"
        if isinstance(message.get("tool_calls"), dict):
            message["tool_calls"] = [message["tool_calls"]]
        if message.get("tool_calls") is None:
            message.pop("tool_calls", None)
        if "tools" in message:
            if message.get("role") != "system":
                return None, None, f'{field}[{i}]: only a system message carries "tools"'
            tools, error = read_tools(message.pop("tools"), f"{field}[{i}].tools")
            if error:
                return None, None, error
        reasoning = message.pop("reasoning_content", None)
        if reasoning is not None and not isinstance(reasoning, str):
            return None, None, f"{field}[{i}].reasoning_content must be a string, got {type(reasoning).__name__}"
        if reasoning and isinstance(message.get("content"), (str, type(None))):  # other content: validate_messages says
            message["content"] = f"<think>\n{reasoning}\n</think>\n\n{message.get('content') or ''}"
        normalised.append(message)
    return normalised, tools, None


def read_conversation(row, field="conversations"):
    """(messages, tools, error) of a row's conversation: normalised (normalise_messages), then validated; the
    tools come from the row's "tools" field (a list or its JSON string) or a system message."""
    messages, tools, error = normalise_messages(row.get(field), field)
    row_tools, tools_error = read_tools(row.get("tools"))
    return messages, row_tools or tools, error or validate_messages(messages, field) or tools_error


def has_answer(message) -> bool:
    """An assistant turn with something to learn: non-blank content or at least one tool call."""
    return message["role"] == "assistant" and bool((message.get("content") or "").strip() or message.get("tool_calls"))


def assistant_spans(text: str):
    """Character spans that carry loss: each assistant turn's content, its <|im_end|> and the newline after."""
    spans, pos = [], 0
    while (start := text.find(ASSISTANT_START, pos)) != -1:
        begin = start + len(ASSISTANT_START)
        end = text.find(TURN_END, begin)
        end = len(text) if end == -1 else end + len(TURN_END) + (text[end + len(TURN_END):].startswith("\n"))
        spans.append((begin, end))
        pos = end
    return spans


def tokenize_with_loss_mask(tokenizer, text: str, max_length: int):
    """Token ids of `text` and a 0/1 mask marking tokens that start inside an assistant span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_spans(text)
    ids = encoded["input_ids"][:max_length]
    mask = [int(any(b <= start < e for b, e in spans)) for start, _ in encoded["offset_mapping"][:max_length]]
    return ids, mask


def pretrain_row(row, tokenizer, max_length, draws=None, augment=NO_AUGMENTATION):
    """<bos> text <eos>. A text longer than max_length - 2 tokens is cut there and still ends in <eos>, as upstream
    does it (MiniMind's PretrainDataset); max_length None (packing) keeps the whole text."""
    if not isinstance(row.get("text"), str):
        return None, 'expected {"text": string}'
    ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    cut = max_length is not None and len(ids) > max_length - 2
    if cut:
        ids = ids[:max(max_length - 2, 0)]
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    return dict(input_ids=ids[:max_length], notes=TRUNCATED if cut else 0), None


def add_system_prompt(messages, tools, augment, draws):
    """(messages, notes): a system prompt from SYSTEM_PROMPTS before a share of the conversations that have no
    tools and no system message (upstream's rule: a tool conversation is kept whole)."""
    if tools or messages[0]["role"] == "system":
        return messages, 0
    if draws is None or draws[1] >= augment.add_system_ratio:
        return messages, NO_SYSTEM
    prompt = SYSTEM_PROMPTS[min(int(draws[2] * len(SYSTEM_PROMPTS)), len(SYSTEM_PROMPTS) - 1)]
    return [dict(role="system", content=prompt)] + messages, NO_SYSTEM | ADDED_SYSTEM


def drop_empty_think(texts, augment, draws):
    """(texts, notes): the empty think block at the start of every assistant turn left out of all the texts (a DPO
    pair's two sides) together, for a share of the rows that have one. Only a block right after
    "<|im_start|>assistant\n" goes, never text elsewhere that happens to look like one."""
    opening = ASSISTANT_START + EMPTY_THINK
    if not any(opening in text for text in texts):
        return texts, 0
    if draws is None or draws[0] >= augment.drop_empty_think:
        return texts, HAD_EMPTY_THINK
    return [text.replace(opening, ASSISTANT_START) for text in texts], HAD_EMPTY_THINK | DROPPED_THINK


def sft_row(row, tokenizer, max_length, draws=None, augment=NO_AUGMENTATION):
    """draws: the row's Augmentation.row_draws (None: no augmentation)."""
    messages, tools, error = read_conversation(row)
    if error:
        return None, error + ' (expected {"conversations": [{"role": ..., "content": ...}, ...]})'
    if not any(has_answer(m) for m in messages):
        return None, "the conversation has no non-empty assistant turn (content or tool calls) to learn from"
    messages, system_notes = add_system_prompt(messages, tools, augment, draws)
    [text], think_notes = drop_empty_think([render(tokenizer, messages, tools)], augment, draws)
    ids, mask = tokenize_with_loss_mask(tokenizer, text, max_length)
    if not any(mask):
        return None, CUT_OFF
    return dict(input_ids=ids, loss_mask=mask, notes=system_notes | think_notes), None


def dpo_messages(row):
    """Both accepted layouts -> (chosen messages, rejected messages) or an error."""
    if all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
        prompt = [dict(role="user", content=row["prompt"])]
        return (prompt + [dict(role="assistant", content=row["chosen"])],
                prompt + [dict(role="assistant", content=row["rejected"])], None)
    sides = []
    for side in ("chosen", "rejected"):
        messages, _, error = read_conversation(row, side)
        if error:
            return None, None, error + ' (expected {"chosen": [messages], "rejected": [messages]} or ' \
                                       '{"prompt": str, "chosen": str, "rejected": str})'
        sides.append(messages)
    return sides[0], sides[1], None


def dpo_row(row, tokenizer, max_length, draws=None, augment=NO_AUGMENTATION):
    """draws: the pair's Augmentation.row_draws (None: no augmentation); only the empty think blocks can go, from
    both sides or neither (upstream adds DPO rows no system prompt)."""
    chosen, rejected, error = dpo_messages(row)
    if error:
        return None, error
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(has_answer(m) for m in messages):
            return None, f"{side} has no non-empty assistant turn (content or tool calls)"
    if chosen == rejected:
        return None, "chosen and rejected are identical: there is no preference to learn"
    texts, notes = drop_empty_think([render(tokenizer, chosen), render(tokenizer, rejected)], augment, draws)
    out = dict(notes=notes)
    for side, text in zip(("chosen", "rejected"), texts):
        ids, mask = tokenize_with_loss_mask(tokenizer, text, max_length)
        if not any(mask):
            return None, CUT_OFF
        out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
    return out, None


def rlaif_row(row, tokenizer, max_length, draws=None, augment=NO_AUGMENTATION):
    """RL prompts (rlaif.jsonl) and minimind-3's agent_rl rows ({"conversations": [system with tools, user,
    assistant placeholder], "gt": [strings the final answer must contain]}): extra fields are kept."""
    messages, tools, error = read_conversation(row)
    if error:
        return None, error + ' (expected {"conversations": [..., {"role": "assistant", "content": ""}]})'
    taken = [f'"{k}"' for k in ("prompt", "conversation") if k in row]
    if taken:  # RLAIFDataset's items carry the rendered prompt and its messages under these names
        return None, (f'the loader fills in "prompt" and "conversation" (the rendered prompt, its messages): '
                      f"rename this row's {' and '.join(taken)}")
    if messages[-1]["role"] == "assistant":  # the placeholder the policy will fill
        messages = messages[:-1]
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        return None, "the prompt must end with a user (or tool) turn before the assistant placeholder"
    extras = {k: v for k, v in row.items() if k != "conversations"}
    extras["conversation"] = messages  # the prompt as messages, for reward models
    if tools:
        extras["tools"] = tools  # offered in the prompt (parsed): a tool-use reward can check the calls against them
    return dict(prompt=render(tokenizer, messages, tools, generation_prompt=True),
                extras=json.dumps(extras, ensure_ascii=False)), None


ROW_BUILDERS = {"pretrain": pretrain_row, "sft": sft_row, "dpo": dpo_row, "rlaif": rlaif_row}
FEATURES = {
    "pretrain": dict(input_ids=datasets.List(datasets.Value("uint16"))),
    "sft": dict(input_ids=datasets.List(datasets.Value("uint16")), loss_mask=datasets.List(datasets.Value("uint8"))),
    "dpo": {f"{side}_{k}": datasets.List(datasets.Value(t)) for side in ("chosen", "rejected")
            for k, t in (("ids", "uint16"), ("mask", "uint8"))},
    "rlaif": dict(prompt=datasets.Value("string"), extras=datasets.Value("string")),
}


def _parse_batch(batch, indices, kind, tokenizer, max_length, path, file_number=0, augment=NO_AUGMENTATION):
    """datasets.map body: raw text lines -> tokenised columns, a notes column (what was done to the row: TRUNCATED,
    DROPPED_THINK, ...) and an error column ("" = good row). indices: the lines' numbers in the file (from 0), which
    with file_number (the file's place in the list) fix each row's augmentation."""
    out = {name: [] for name in FEATURES[kind]}
    out["notes"], out["error"] = [], []
    empty = {name: ("" if kind == "rlaif" else []) for name in FEATURES[kind]}
    for line, index in zip(batch["text"], indices):
        built, error = None, None
        if not line.strip():
            error = "blank"
        else:
            row, error = read_json_line(line)
            if row is not None:
                draws = augment.row_draws(file_number, index) if augment.active else None
                try:  # the validators should leave the template nothing to refuse; if it does, it is this line's fault
                    built, error = ROW_BUILDERS[kind](row, tokenizer, max_length, draws, augment)
                except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as err:
                    error = f"the chat template cannot render this row ({type(err).__name__}: {err})"
                except RecursionError:
                    error = "nested too deeply to read"
        for name in FEATURES[kind]:
            out[name].append(built[name] if built else empty[name])
        out["notes"].append(built.get("notes", 0) if built else 0)
        out["error"].append("" if built else (error if error in ("blank", CUT_OFF) else f"{path} line {index + 1}: {error}"))
    return out


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return _fingerprint(backend.to_str() if backend is not None else repr(tokenizer), tokenizer.chat_template)


NOTE_COUNTS = dict(truncated=TRUNCATED, empty_think=HAD_EMPTY_THINK, empty_think_dropped=DROPPED_THINK,
                   no_system=NO_SYSTEM, system_added=ADDED_SYSTEM)


def load_jsonl(paths, kind: str, tokenizer, max_length: int | None, on_bad_line: str = "error",
               num_proc: int | None = None, cache_dir: str | None = None, augment: Augmentation = NO_AUGMENTATION):
    """Parse + tokenise JSONL files into one Arrow dataset. Returns (dataset, report dict). The report counts the rows
    used, the bad lines skipped, the blank lines, the rows whose answer lies beyond max_length (cut_off, left out),
    and among the rows used: the pretraining documents cut to max_length (truncated), the rows with an empty think
    block and those it was dropped from (empty_think, empty_think_dropped), the rows without tools or a system
    message and those given a system prompt (no_system, system_added)."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError('on_bad_line must be "error" or "skip"')
    parts, report = [], dict(files=[], rows=0, skipped=0, blank_lines=0, cut_off=0, first_errors=[],
                             **{name: 0 for name in NOTE_COUNTS})
    for file_number, path in enumerate(split_paths(paths)):
        check_file(path)
        size = os.path.getsize(path)
        procs = num_proc or (1 if size < 64 * 2**20 else min(8, os.cpu_count() or 1))
        lines = datasets.load_dataset("text", data_files=path, split="train", cache_dir=cache_dir,
                                      encoding_errors=UTF8_ERRORS)  # a non-UTF-8 byte: a bad line (read_json_line)
        features = datasets.Features({**FEATURES[kind], "notes": datasets.Value("uint8"),
                                      "error": datasets.Value("string")})
        parsed = lines.map(
            _parse_batch, batched=True, with_indices=True, remove_columns=["text"], features=features,
            fn_kwargs=dict(kind=kind, tokenizer=tokenizer, max_length=max_length, path=path, file_number=file_number,
                           augment=augment),
            num_proc=procs if len(lines) > 1000 else None, desc=f"tokenising {os.path.basename(path)}",
            new_fingerprint=_fingerprint(CACHE_VERSION, kind, lines._fingerprint, tokenizer_fingerprint(tokenizer),
                                         max_length, path, augment.key() and (augment.key(), file_number)))
        errors = parsed.filter(lambda e: [x != "" for x in e], batched=True, input_columns=["error"],
                               new_fingerprint=_fingerprint(parsed._fingerprint, "errors"))
        # a slice reads a column in one Arrow call; ds["col"] on a filtered dataset decodes it row by row (~1 s / 10k rows)
        kinds = errors[:]["error"] if len(errors) else []
        blank, cut_off = kinds.count("blank"), kinds.count(CUT_OFF)
        bad = [e for e in kinds if e not in ("blank", CUT_OFF)]
        if bad and on_bad_line == "error":
            more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}. Fix the data, or skip and count bad lines with --skip_bad_lines.")
        good = parsed.filter(lambda e: [x == "" for x in e], batched=True, input_columns=["error"],
                             new_fingerprint=_fingerprint(parsed._fingerprint, "good"))
        notes = good.with_format("numpy", columns=["notes"])[:]["notes"] if len(good) else np.zeros(0, int)
        for name, bit in NOTE_COUNTS.items():
            report[name] += int(np.count_nonzero(notes & bit))
        good = good.remove_columns(["notes", "error"])
        report["files"].append(path)
        report["rows"] += len(good)
        report["skipped"] += len(bad)
        report["blank_lines"] += blank
        report["cut_off"] += cut_off
        report["first_errors"] += bad[:5]
        parts.append(good)
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(data) == 0:
        raise DataError(f"no usable rows in {', '.join(report['files'])} "
                        f"({report['skipped']} bad lines, {report['blank_lines']} blank lines)")
    return data, report


def pack_rows(data, max_length: int):
    """Concatenate documents (each already <bos> ... <eos>) and cut the stream into rows of max_length.

    Every token is kept: the tail of each map batch becomes one shorter row.
    """
    def pack(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        return {"input_ids": [stream[i:i + max_length] for i in range(0, len(stream), max_length)]}
    return data.map(pack, batched=True, batch_size=2000, remove_columns=data.column_names,
                    new_fingerprint=_fingerprint(data._fingerprint, "pack", max_length))


def pack_conversations(data, max_length: int):
    """Place whole conversations into rows of at most max_length tokens, so batches hold almost no padding.

    First-fit decreasing inside each window of 1,000 conversations: the longest goes first, each into the
    first row with room. A row keeps position_ids that restart at 0 where a conversation starts; given
    those, the model keeps attention inside each conversation, so every token's loss is the one it has
    alone (and the first token of a conversation, never an answer token, carries no loss).
    """
    def pack(batch):
        ids, masks = [list(x) for x in batch["input_ids"]], [list(x) for x in batch["loss_mask"]]
        rows, room = [], []
        for i in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
            row = next((r for r, free in enumerate(room) if len(ids[i]) <= free), None)
            if row is None:
                row = len(rows)
                rows.append([])
                room.append(max_length)
            rows[row].append(i)
            room[row] -= len(ids[i])
        return {"input_ids": [[t for i in row for t in ids[i]] for row in rows],
                "loss_mask": [[m for i in row for m in [0] + masks[i][1:]] for row in rows],
                "position_ids": [[p for i in row for p in range(len(ids[i]))] for row in rows]}
    features = datasets.Features({**FEATURES["sft"], "position_ids": datasets.List(datasets.Value("uint16"))})
    return data.map(pack, batched=True, batch_size=1000, remove_columns=data.column_names, features=features,
                    new_fingerprint=_fingerprint(data._fingerprint, "pack conversations", max_length))


# ----------------------------------------------------------------------------------------------
# torch Datasets
# ----------------------------------------------------------------------------------------------

class _ArrowDataset(Dataset):
    kind = ""

    def __init__(self, data_path, tokenizer, max_length=512, on_bad_line="error", num_proc=None, cache_dir=None,
                 augment=NO_AUGMENTATION, cut=True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.augment = augment
        # cut=False: rows are tokenised whole (packed pretraining cuts the stream, not the documents)
        data, self.report = load_jsonl(data_path, self.kind, tokenizer, max_length if cut else None, on_bad_line,
                                       num_proc, cache_dir, augment)
        message = load_message(self.report, max_length, augment)
        if message:
            print(message)
        self.data = data.with_format("numpy")  # rows come back as arrays, not Python lists

    def __len__(self):
        return len(self.data)

    def lengths(self):
        """Tokens per row (the longer side of a preference pair), read from the Arrow columns without
        decoding the rows; used by --group_by_length."""
        table = self.data.with_format("arrow")
        sides = [pc.list_value_length(table[c]).to_numpy() for c in self.data.column_names
                 if c.endswith("_ids") and c != "position_ids"]
        if not sides:
            raise ValueError(f"{type(self).__name__} rows hold no tokens to group by length")
        return torch.from_numpy(np.maximum.reduce(sides).astype(np.int64))


def load_message(report, max_length, augment=NO_AUGMENTATION):
    """The line a dataset prints when it loads: the rows used and everything done to the others or to them (bad lines
    skipped, rows left out, documents cut, augmentation); None when there is nothing to say but the row count."""
    r, parts = report, []
    if r["skipped"]:
        first = f" (first: {r['first_errors'][0]})" if r["first_errors"] else ""
        parts.append(f"{r['skipped']} bad lines skipped{first}")
    if r["cut_off"]:
        parts.append(f"{r['cut_off']} rows left out because no answer token fits in max_length={max_length} (raise "
                     "--max_seq_len to keep them; MiniMind keeps such rows, with no token to learn)")
    if r["truncated"]:
        parts.append(f"{r['truncated']} documents cut to max_length={max_length} (each still ends in <|im_end|>, as in "
                     "MiniMind)")
    if augment.drop_empty_think and not r["empty_think"]:
        parts.append(f"no row opens an answer with an empty think block to drop (--drop_empty_think "
                     f"{augment.drop_empty_think:g} changes nothing: this chat template writes none, minimind-3's does)")
    elif augment.drop_empty_think:
        parts.append(f"empty think block dropped from {r['empty_think_dropped']} of the {r['empty_think']} rows that "
                     f"have one (--drop_empty_think {augment.drop_empty_think:g})")
    if augment.add_system_ratio:
        parts.append(f"a system prompt added to {r['system_added']} of the {r['no_system']} rows without tools or a "
                     f"system message (--add_system_ratio {augment.add_system_ratio:g})")
    if not parts:
        return None
    return f"{', '.join(r['files'])}: {r['rows']} rows used; " + "; ".join(parts)


def _long(array):
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


class PretrainDataset(_ArrowDataset):
    """Next-token prediction on raw text. packing=True concatenates the documents (each <bos> ... <eos>) into one
    stream and cuts it into rows of max_length (pack_rows): no compute goes to padding, a document may continue in
    the next row, and documents in one row see each other. Without packing a document longer than max_length is cut
    to max_length - 2 tokens between <bos> and <eos> (as MiniMind's); packed, every document is kept whole."""
    kind = "pretrain"

    def __init__(self, data_path, tokenizer, max_length=512, packing=False, **kwargs):
        super().__init__(data_path, tokenizer, max_length, cut=not packing, **kwargs)
        if packing:
            self.data = pack_rows(self.data, max_length).with_format("numpy")

    def __getitem__(self, index):
        ids = _long(self.data[int(index)]["input_ids"])
        return dict(input_ids=ids, labels=ids.clone())


class SFTDataset(_ArrowDataset):
    """Chat data: the loss covers each assistant turn's content, its <|im_end|> and the newline after.
    packing=True puts several whole conversations in a row (pack_conversations); rows then also carry
    position_ids, which the trainers pass to the model to keep attention inside each conversation.
    drop_empty_think, add_system_ratio, seed: minimind-3's augmentation (Augmentation; 0 and 0 = none)."""
    kind = "sft"

    def __init__(self, data_path, tokenizer, max_length=512, packing=False, drop_empty_think=0.0,
                 add_system_ratio=0.0, seed=0, **kwargs):
        super().__init__(data_path, tokenizer, max_length,
                         augment=Augmentation(drop_empty_think, add_system_ratio, seed), **kwargs)
        if packing:
            self.data = pack_conversations(self.data.with_format(None), max_length).with_format("numpy")

    def __getitem__(self, index):
        row = self.data[int(index)]
        ids = _long(row["input_ids"])
        out = dict(input_ids=ids, labels=ids.masked_fill(_long(row["loss_mask"]) == 0, -100))
        if "position_ids" in row:
            out["position_ids"] = _long(row["position_ids"])
        return out


class DPODataset(_ArrowDataset):
    """Preference pairs; each side carries labels masked to its assistant turns. drop_empty_think, seed:
    minimind-3's augmentation (Augmentation), the same draw for both sides of a pair."""
    kind = "dpo"

    def __init__(self, data_path, tokenizer, max_length=512, drop_empty_think=0.0, seed=0, **kwargs):
        super().__init__(data_path, tokenizer, max_length, augment=Augmentation(drop_empty_think, 0.0, seed), **kwargs)

    def __getitem__(self, index):
        row = self.data[int(index)]
        out = {"index": torch.tensor(int(index))}  # lets a trainer look up precomputed reference log-probs
        for side in ("chosen", "rejected"):
            ids = _long(row[f"{side}_ids"])
            out[f"{side}_input_ids"] = ids
            out[f"{side}_labels"] = ids.masked_fill(_long(row[f"{side}_mask"]) == 0, -100)
        return out


class RLAIFDataset(_ArrowDataset):
    """RL prompts rendered with the generation prompt; extra fields (task, answers, ...) are kept."""
    kind = "rlaif"

    def __getitem__(self, index):
        row = self.data[int(index)]
        return dict(prompt=str(row["prompt"]), **json.loads(str(row["extras"])))


class AgentRLDataset(Dataset):
    """Agentic RL tasks, MiniMind's agent_rl.jsonl rows: {"conversations": [...], "gt": [answers]}. The tools offered
    are in the system message's "tools" (a list, or its JSON string), or in a row-level "tools"; a final assistant
    turn (the reference answer) is left out, so the conversation ends with the request. gt: what a right final reply
    contains. Small files: read whole, no cache."""

    def __init__(self, data_path, on_bad_line="error"):
        self.rows, self.skipped = [], 0
        for path in data_path.split(","):
            with open(path, encoding="utf-8", errors=UTF8_ERRORS) as f:  # non-UTF-8 bytes: a bad line
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        self.rows.append(self.parse(line))
                    except (ValueError, TypeError, KeyError) as error:
                        if on_bad_line == "error":
                            raise DataError(f"{path}:{number}: {error}") from None
                        self.skipped += 1
        if not self.rows:
            raise DataError(f"{data_path}: no agentic RL rows")

    @staticmethod
    def parse(line):
        """A line -> the row train_agent uses, or a ValueError saying what is wrong. The messages are read like
        SFT's (normalise_messages, validate_messages), so the rollout's chat template renders them."""
        row, error = read_json_line(line)
        if error:
            raise ValueError(error)
        if not isinstance(row.get("conversations"), list):
            raise ValueError('expected {"conversations": [messages], "gt": [answers]}')
        gt = row.get("gt")
        if not isinstance(gt, list) or not all(isinstance(g, (str, int, float)) for g in gt):
            raise ValueError('"gt" must be a list of answers (strings or numbers)')
        messages, system_tools, error = normalise_messages(row["conversations"])
        error = error or validate_messages(messages)
        tools, tools_error = read_tools(system_tools or row.get("tools"))  # a system message's tools come first
        if error or tools_error:
            raise ValueError(error or tools_error)
        # the reward reads each offered tool's function name
        if tools and not all(isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
                             for t in tools):
            raise ValueError('"tools" must be a list of {"type": "function", "function": {"name": string, ...}}')
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the conversation must end with the user's request (before an optional final answer)")
        return dict(messages=messages, tools=tools or [], gt=[str(g) for g in gt])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[int(index)]


def pad_batch(rows, pad_id: int = 0):
    """Collate: pad every tensor field to the longest row of this batch (labels with -100), and add an
    attention_mask per input_ids field. Non-tensor fields are gathered into lists (None where missing)."""
    batch = {}
    for key in dict.fromkeys(k for r in rows for k in r):  # every field of any row, in order
        values = [r.get(key) for r in rows]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = values  # e.g. prompts or answers; None where a row lacks the field
            continue
        if values[0].dim() == 0:  # per-row scalars, e.g. a sample index
            batch[key] = torch.stack(values)
            continue
        width = max(v.shape[0] for v in values)
        fill = -100 if key.endswith("labels") else pad_id
        padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            padded[i, :v.shape[0]] = v
        batch[key] = padded
        if key.endswith("input_ids"):
            mask = torch.zeros((len(values), width), dtype=torch.long)
            for i, v in enumerate(values):
                mask[i, :v.shape[0]] = 1
            batch[key.replace("input_ids", "attention_mask")] = mask
    return batch


def stack_pairs(batch, pad_id):
    """Chosen rows then rejected rows, right-padded to one width, for a single forward pass. Under causal
    attention a right-padded row needs no attention mask (see train_full_sft.py); the mask is returned for
    callers that want it."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)
    ids = torch.cat([pad(batch["chosen_input_ids"], pad_id), pad(batch["rejected_input_ids"], pad_id)])
    mask = torch.cat([pad(batch["chosen_attention_mask"], 0), pad(batch["rejected_attention_mask"], 0)])
    labels = torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])
    return ids, mask, labels
