"""What eval_llm.py, the OpenAI-compatible server and the web chat share: load a trained model from a native .pth or
a transformers folder (+ LoRA), fit a conversation into a token budget, stream a reply token by token with the
KV cache, and run a turn whose replies call tools. The chat format itself - rendering a conversation, the thinking
switch, reading a reply's think block and tool calls - is common/chat.py.

    chat = load_chat_model("out/full_sft_512.pth")                 # or a folder from convert_model.py
    prompt_ids, kept = fit_prompt(chat.tokenizer, messages, budget=1024)
    with chat.lock:                                                  # one request at a time per model
        for event in stream_reply(chat, prompt_ids, max_tokens=256):
            print(event["delta"], end="")
"""
import os
import threading
from dataclasses import dataclass, field

import torch
from transformers import (AutoModelForCausalLM, DynamicCache, LogitsProcessorList,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from common.chat import render, split_reply
from common.device import inference_dtype, pick_device, ready_device
from common.tokenizer import check_recorded, check_tokenizer_fits, tokenizer_for
from inference.tools import run_tool
from model.model_lora import apply_lora, load_lora, lora_layout
from model.model_minimind import MiniMindForCausalLM
from model.qwen3_format import is_qwen3_folder, load_qwen3_folder
from model.weights import config_from_state_dict, load_state_dict_strict


@dataclass
class ChatModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)  # generation is not re-entrant


class PromptTooLong(ValueError):
    pass


def load_chat_model(path, lora_path=None, lora_alpha=None, device=None, inference_rope_scaling=False,
                    tokenizer_dir=None, trust_remote_code=True):
    """A ChatModel from a native .pth (any size: the config is read off the tensors) or a transformers
    folder, with an optional from-scratch LoRA file applied on top. Weights are held in inference_dtype:
    bf16 (fp16 before sm80, and on MPS) on a GPU, fp32 on a CPU.

    The tokenizer: tokenizer_dir, else the one the folder ships, else model/ (this project's). A tokenizer the
    weight was not trained with stops the load with the reason, as does a weight holding nan or inf
    (check_tokenizer_fits: the record beside a .pth, and a LoRA file's, else the probe; a warning when tokenizer_dir
    names a tokenizer the probe or the chat template doubts), and a tokenizer_dir that differs from the one the
    folder ships.

    trust_remote_code=False (the server's weight updates: folders another process wrote): a folder whose config.json
    asks for code of its own (auto_map: a module in the folder, imported to load it) is refused instead of run.
    Plain Llama / Qwen3 layouts need none."""
    device = ready_device(device or pick_device())  # --device cuda:1 becomes the current device, as in training
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"{path}: a model folder needs config.json (make one with scripts/convert_model.py)")
        tokenizer, tokenizer_path = tokenizer_for(path, tokenizer_dir)
        if is_qwen3_folder(path):  # a released minimind-3 folder: loaded as our own model, same logits
            model = load_qwen3_folder(path, inference_rope_scaling=inference_rope_scaling)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                             dtype=torch.float32)
            except ValueError as e:  # transformers' refusal says to pass trust_remote_code=True: not ours to do here
                if trust_remote_code or "trust_remote_code" not in str(e):
                    raise
                raise SystemExit(f"{path} needs code from its own folder to load (config.json's auto_map), which is "
                                 f"not run here: send a plain Llama / Qwen3 model folder") from e
    elif os.path.isfile(path):
        tokenizer, tokenizer_path = tokenizer_for(path, tokenizer_dir)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = MiniMindForCausalLM(config_from_state_dict(state, inference_rope_scaling=inference_rope_scaling))
        load_state_dict_strict(model, state, source=path)
    else:
        raise SystemExit(f"{path} is neither a .pth file nor a model folder")
    # finite values, and the tokenizer: the .pth's record, or the probe (a folder's own tokenizer is its own)
    check_tokenizer_fits(model, tokenizer, tokenizer_path, path, chosen=bool(tokenizer_dir))
    name = os.path.basename(os.path.normpath(path)).removesuffix(".pth")
    if lora_path:
        if not os.path.isfile(lora_path):
            raise SystemExit(f"LoRA weight {lora_path} does not exist")
        check_recorded(lora_path, tokenizer, tokenizer_path, chosen=bool(tokenizer_dir))  # the adapters' own record
        lora = torch.load(lora_path, map_location="cpu", weights_only=True)
        rank, targets = lora_layout(lora)
        apply_lora(model, rank=rank, alpha=lora_alpha, target_modules=targets)
        load_lora(model, lora)
        name += "+" + os.path.basename(lora_path).removesuffix(".pth")
    return ChatModel(model.eval().to(device, dtype=inference_dtype(device)), tokenizer, name, device)


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts, max_new_tokens=32, batch_size=32):
    """Greedy replies to rendered prompts, generated in left-padded batches on the model's device."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    replies = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            replies += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = "right"
    return replies


def fit_prompt(tokenizer, messages, budget, tools=None, thinking=None, prefix=""):
    """Token ids of the rendered conversation, at most `budget` of them: whole turns are dropped from
    the oldest (a leading system message stays), never text sliced by characters. tools and thinking
    (True / False / None: common.chat.render) go to the chat template; prefix is appended after the generation
    prompt (the start of the reply, which the model continues). Returns (ids, the messages kept)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    while turns:
        text = render(tokenizer, system + turns, tools, thinking=thinking, generation_prompt=True) + prefix
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= budget:
            return ids, system + turns
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with the user
            turns = turns[1:]
    raise PromptTooLong(f"the last message alone needs more than {budget} prompt tokens")


class TokenSampler:
    """One request's next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling
    from its own generator, so a seeded request draws the same numbers whatever else is being served."""

    def __init__(self, temperature, top_p, seed, device, top_k=0):
        self.warpers = None if temperature <= 0 else LogitsProcessorList(
            [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else []) +
            [TopPLogitsWarper(top_p)])
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.logprobs = []  # each chosen token's log-prob under the distribution it was drawn from

    def __call__(self, logits):
        """logits [1, V] (float) -> the next token id."""
        if self.warpers is None:
            token = int(logits.argmax(-1))
            self.logprobs.append(float(logits.log_softmax(-1)[0, token]))
            return token
        warped = self.warpers(None, logits)  # these warpers never read the input ids
        token = int(torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=self.generator))
        self.logprobs.append(float(warped.log_softmax(-1)[0, token]))
        return token


class ReplyText:
    """One reply's tokens turned into text events: {"delta": text} as text becomes final, and last
    {"delta", "finish_reason" ("stop": end token or a stop string, "length": max_tokens), "completion_tokens"}.
    A stop string ends the reply and is not part of it; text that could still become one is held back."""

    def __init__(self, tokenizer, max_tokens, stop=(), stop_token_ids=()):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, list(stop)
        self.end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, *stop_token_ids} - {None}
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.generated, self.text, self.sent, self.finished = [], "", 0, False

    def add(self, token):
        """Take the next token; return the events it makes (none, one delta, and/or the final event)."""
        self.generated.append(token)
        finish = None
        if token in self.end_ids:
            finish = "stop"
        else:
            self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if cuts:
                self.text, finish = self.text[:min(cuts)], "stop"
            elif len(self.generated) >= self.max_tokens:
                finish = "length"
        if finish:
            self.finished = True
            return [{"delta": self.text[self.sent:], "finish_reason": finish, "completion_tokens": len(self.generated)}]
        ready = len(self.text.rstrip("\ufffd")) - self.hold  # a trailing \ufffd is half of a multi-byte character
        if ready <= self.sent:
            return []
        delta, self.sent = self.text[self.sent:ready], ready
        return [{"delta": delta}]


@torch.no_grad()
def stream_reply(chat, prompt_ids, max_tokens, temperature=0.85, top_p=0.85, stop=(), seed=None):
    """Sample up to max_tokens new tokens after prompt_ids, one forward of one token per step on the
    KV cache; yields ReplyText's events. temperature 0 = greedy. Hold chat.lock (the server shares the
    model between requests with inference/batching.py instead)."""
    sample = TokenSampler(temperature, top_p, seed, chat.device)
    reply = ReplyText(chat.tokenizer, max_tokens, stop)
    inputs = torch.tensor([prompt_ids], device=chat.device)
    cache = DynamicCache(config=chat.model.config)
    while not reply.finished:
        logits = chat.model(inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        token = sample(logits)
        yield from reply.add(token)
        inputs = torch.tensor([[token]], device=chat.device)


def tool_turn(generate, messages, tools=None, tool_rounds=3, on_calls=None):
    """One user turn with tools, as eval_llm.py and the web chat run it: generate(messages) -> the reply's text;
    while the reply is a tool call (and rounds are left), run the calls (inference/tools.py), add the call and its
    results to the conversation and generate again. on_calls(calls, results) sees each round's calls. Returns
    the messages the turn adds: assistant calls, tool results and the final assistant answer."""
    added = []
    for round_number in range(tool_rounds + 1):
        answer = generate(messages + added)
        calls = split_reply(answer)[2] if tools else None
        if not calls or round_number == tool_rounds:
            return added + [{"role": "assistant", "content": answer}]
        results = [run_tool(call["name"], call["arguments"]) for call in calls]
        if on_calls is not None:
            on_calls(calls, results)
        added.append({"role": "assistant", "content": "",
                      "tool_calls": [{"type": "function", "function": call} for call in calls]})
        added += [{"role": "tool", "content": result} for result in results]
