"""MiniMind's names and settings that work here too (issue 32): --thinking_ratio in the single-turn RL stages, the
--sglang_* spellings of the engine flags, eval_toolcall.py's interactive mode (--backend local|api), and LoRA files
in either layout (out/lora/{name}_{h}.pth, this project's; out/{name}_{h}.pth, MiniMind's)."""
import http.server
import io
import json
import random
import sys
import threading
from types import SimpleNamespace

import pytest

from common.chat import render
from common.tokenizer import load_tokenizer
from conftest import PROJECT_TOKENIZER, talkative_weight
from test_agent import minimind3_style_tokenizer
from test_train import metrics, run_script
from trainer.rl import rewards, sampling

QUESTIONS = [[{"role": "user", "content": f"问题 {i}：1+{i}=?"}] for i in range(2000)]


def rlaif_batch(tokenizer, conversations):
    """A micro-batch as RLAIFDataset + pad_batch give it: the prompt rendered with no thinking switch, its messages."""
    return {"prompt": [render(tokenizer, c, generation_prompt=True) for c in conversations],
            "conversation": conversations, "answers": [["42"]] * len(conversations)}


# --------------------------------------------------------------------------------------------
# --thinking_ratio in GRPO / PPO / SPO
# --------------------------------------------------------------------------------------------

def test_thinking_share_defaults_to_0_9_with_a_switch_and_refuses_a_template_without_one():
    switch, plain = minimind3_style_tokenizer(), load_tokenizer()
    assert sampling.thinking_share(None, switch) == 0.9 and sampling.thinking_share(0.25, switch) == 0.25
    assert sampling.thinking_share(0.0, switch) == 0.0
    assert sampling.thinking_share(None, plain) == 0.0 and sampling.thinking_share(0, plain) == 0.0  # 0 refuses nothing
    with pytest.raises(SystemExit, match="--thinking_ratio 0.5: this tokenizer's chat template has no thinking switch"):
        sampling.thinking_share(0.5, plain)


def test_that_share_of_prompts_opens_thinking_drawn_from_the_seeded_rng():
    tokenizer = minimind3_style_tokenizer()
    batch = rlaif_batch(tokenizer, QUESTIONS)
    prompts, flags = sampling.thinking_prompts(tokenizer, batch, 0.9, random.Random(7))
    assert 0.87 < sum(flags) / len(flags) < 0.93
    for prompt, opened, dataset_prompt, conversation in zip(prompts, flags, batch["prompt"], QUESTIONS):
        if opened:  # rendered again with the switch on: the prompt ends inside <think>
            assert prompt == render(tokenizer, conversation, thinking=True, generation_prompt=True)
            assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        else:  # the dataset's text: minimind-3's empty think block
            assert prompt == dataset_prompt and prompt.endswith("<think>\n\n</think>\n\n")
    # the same seed draws the same prompts (the trainers seed the global RNG and a resume restores it)
    assert sampling.thinking_prompts(tokenizer, batch, 0.9, random.Random(7))[1] == flags
    assert sampling.thinking_prompts(tokenizer, batch, 0.9, random.Random(8))[1] != flags
    random.seed(3)
    state = random.getstate()
    first = sampling.thinking_prompts(tokenizer, batch, 0.5)[1]
    random.setstate(state)
    assert sampling.thinking_prompts(tokenizer, batch, 0.5)[1] == first
    # 0: nothing drawn (the RNG, which also seeds a server engine's requests, moves on as before), nothing changed
    state = random.getstate()
    assert sampling.thinking_prompts(tokenizer, batch, 0.0) == (batch["prompt"], [False] * len(QUESTIONS))
    assert random.getstate() == state


class ScriptedEngine:
    temperature = 1.0

    def __init__(self, reply_ids):
        self.reply_ids, self.contexts = reply_ids, []

    def generate(self, contexts, max_new_tokens):
        self.contexts += contexts
        return [(list(self.reply_ids), [-0.5] * len(self.reply_ids)) for _ in contexts]


def test_an_answer_to_an_opened_think_block_is_scored_with_it():
    """The reply to a prompt that opened <think> starts inside it: the rewards read it with "<think>\\n" in front, so
    the exact layout and the answer after </think> count; the G answers of a prompt share its thinking."""
    tokenizer = minimind3_style_tokenizer()
    reply = tokenizer("想一想\n</think>\n<answer>\n42\n</answer>", add_special_tokens=False).input_ids
    engine = ScriptedEngine(reply + [tokenizer.eos_token_id])
    batch = rlaif_batch(tokenizer, QUESTIONS[:4])
    args = SimpleNamespace(max_seq_len=64, max_gen_len=32, reasoning=1)
    random.seed(0)
    rollout, scores = sampling.sample_and_score(engine, tokenizer, batch, args, None, samples_per_prompt=2,
                                                thinking_ratio=0.5)
    assert len(rollout.thinking) == 8 and rollout.thinking[0::2] == rollout.thinking[1::2]
    assert 0 < sum(rollout.thinking) < 8  # both kinds in this draw
    for thinking, opened, text, score in zip(rollout.thinking, rollout.opened, rollout.scored_texts, scores.tolist()):
        assert opened == ("<think>\n" if thinking else "")
        # opened: the exact layout, four tags once each and the answer (2.5); closed: three tags and the answer
        assert (text.startswith("<think>\n"), score) == ((True, 2.5) if thinking else (False, 0.75 + 1.0))
    # no <answer> block: the answer is what follows the think block, never the thinking itself
    assert rewards.answer_reward("<think>\n是 41 吗\n</think>\n\n42", ["42"]) == 1.0
    assert rewards.answer_reward("<think>\n42", ["42"]) == 0.0  # never closed: no answer given
    assert rewards.answer_reward("42", ["42"]) == 1.0


def test_grpo_logs_the_share_of_opened_prompts(tmp_path):
    """One GRPO step with minimind-3's switch and the default --thinking_ratio (0.9): the share is logged. (PPO and SPO
    log it the same way, from the same rollouts.)"""
    tokenizer = tmp_path / "minimind3_style_tokenizer"
    minimind3_style_tokenizer().save_pretrained(tokenizer)
    run_script("train_grpo.py", "--from_weight", "none", "--tokenizer_dir", str(tokenizer), "--max_gen_len", "6",
               "--dtype", "float32", "--num_generations", "2", "--max_steps", "1", tmp=tmp_path)
    [row] = metrics(tmp_path, "grpo_64_metrics.jsonl")
    assert row["thinking_share"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 prompts a step (TINY's batch)


# --------------------------------------------------------------------------------------------
# MiniMind's spellings of the engine flags
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["train_grpo", "train_ppo", "train_spo", "train_agent"])
def test_the_sglang_flags_are_second_names_of_the_engine_flags(module, tmp_path, monkeypatch, capsys):
    import importlib
    arguments = importlib.import_module(f"trainer.{module}").arguments
    monkeypatch.chdir(tmp_path)
    upstream = arguments(["--rollout_engine", "sglang", "--sglang_base_url", "http://127.0.0.1:30000",
                          "--sglang_model_path", "minimind-3", "--sglang_shared_path", "sglang_ckpt"])
    ours = arguments(["--rollout_engine", "sglang", "--rollout_url", "http://127.0.0.1:30000",
                      "--tokenizer_dir", "minimind-3", "--sync_dir", "sglang_ckpt"])
    assert (upstream.rollout_url, upstream.tokenizer_dir, upstream.sync_dir) == \
        ("http://127.0.0.1:30000", str(tmp_path / "minimind-3"), str(tmp_path / "sglang_ckpt"))
    assert vars(upstream) == vars(ours)
    with pytest.raises(SystemExit):
        arguments(["--help"])
    shown = capsys.readouterr().out
    for names in ("--rollout_url ROLLOUT_URL, --sglang_base_url", "--sync_dir SYNC_DIR, --sglang_shared_path",
                  "--sglang_model_path TOKENIZER_DIR"):
        assert names in shown
    if module != "train_agent":
        assert "--thinking_ratio" in shown and arguments([]).thinking_ratio is None  # None: by the template
        for bad in ("1.5", "-0.1"):
            with pytest.raises(SystemExit):
                arguments(["--thinking_ratio", bad])
            assert "--thinking_ratio must be between 0 and 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# eval_toolcall.py's interactive mode
# --------------------------------------------------------------------------------------------

CALL_ARGUMENTS = '{"expression": "12*7"}'


class StandIn(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in: to a user turn it answers a calculator call (its arguments streamed in two
    pieces), to a tool result an answer; it records every request."""
    requests = []

    def log_message(self, *args):
        pass

    def send(self, body, content_type="application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.send(json.dumps({"object": "list", "data": [{"id": "stand-in", "object": "model", "created": 0,
                                                          "owned_by": "test"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append(body)
        calling = body["messages"][-1]["role"] == "user"
        common = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None if calling else "12 × 7 = 84"}
            if calling:
                message["tool_calls"] = [{"id": "call_7", "type": "function",
                                          "function": {"name": "calculator", "arguments": CALL_ARGUMENTS}}]
            return self.send(json.dumps({**common, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if calling else "stop"}]}))
        if calling:
            first = {"index": 0, "id": "call_7", "type": "function",
                     "function": {"name": "calculator", "arguments": CALL_ARGUMENTS[:10]}}
            deltas = [{"role": "assistant", "tool_calls": [first]},
                      {"tool_calls": [{"index": 0, "function": {"arguments": CALL_ARGUMENTS[10:]}}]}]
        else:
            deltas = [{"role": "assistant", "content": "12 × 7 "}, {"content": "= 84"}]
        chunks = [{**common, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
        chunks.append({**common, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "tool_calls" if calling else "stop"}]})
        self.send("".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n", "text/event-stream")


@pytest.fixture
def stand_in():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandIn.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", ["0", "1"])
def test_interactive_api_backend_runs_the_calls_and_sends_the_results_back(stand_in, stream, monkeypatch, capsys):
    from scripts import eval_toolcall
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n12 乘以 7 等于多少？\n\n"))  # typed requests, then an empty line
    args = eval_toolcall.arguments(["--backend", "api", "--api_base_url", stand_in, "--stream", stream])
    assert args.interactive == 1  # the api backend always chats
    eval_toolcall.main(args)
    out = capsys.readouterr().out
    assert '🔧 calculator({"expression": "12*7"}) -> {"result": 84}' in out and "12 × 7 = 84" in out
    first, second = StandIn.requests
    assert first["model"] == "stand-in" and first["messages"] == [{"role": "user", "content": "12 乘以 7 等于多少？"}]
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "dictionary", "calendar"]
    assert second["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "calculator", "arguments": CALL_ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"result": 84}'}]
    assert first.get("stream", False) == (stream == "1")


def test_interactive_local_backend_asks_the_data_requests(tmp_path, monkeypatch, capsys):
    from scripts import eval_toolcall
    weight = talkative_weight(tmp_path / "full_sft_64.pth")
    monkeypatch.setattr(sys, "stdin", io.StringIO("0\n"))  # [0]: the --data requests
    eval_toolcall.main(eval_toolcall.arguments([
        "--interactive", "1", "--load_from", str(weight), "--tokenizer_dir", PROJECT_TOKENIZER, "--device", "cpu",
        "--limit", "2", "--max_new_tokens", "6", "--temperature", "0"]))
    out = capsys.readouterr().out
    assert out.count("📦 tools: ") == 2 and out.count("👶: ") == 2 and out.count("🤖: ") >= 2
    assert "loaded full_sft_64 on cpu" in out


def test_the_local_tool_loop_reads_calls_as_the_server_does(monkeypatch, capsys):
    """local_reply: a reply that is a <tool_call> block becomes a call (its text: what precedes it), then the
    result goes back and the next reply is the answer."""
    from scripts import eval_toolcall
    tokenizer = load_tokenizer()
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
    replies = iter([call, "84"])
    seen = []

    def fake_stream(chat, ids, *args, **kwargs):
        seen.append(tokenizer.decode(ids))
        yield {"delta": next(replies), "finish_reason": "stop"}

    monkeypatch.setattr("inference.chat_core.stream_reply", fake_stream)
    chat = SimpleNamespace(tokenizer=tokenizer)
    settings = SimpleNamespace(max_new_tokens=8, temperature=0, top_p=1, seed=None)
    messages = eval_toolcall.run_request(eval_toolcall.local_reply(chat, settings), "12*7?", eval_toolcall.TOOLS)
    assert messages[1]["content"] == "" and messages[1]["tool_calls"][0]["function"] == \
        {"name": "calculator", "arguments": CALL_ARGUMENTS}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_0_0", "content": '{"result": 84}'}
    assert messages[3] == {"role": "assistant", "content": "84"}
    assert "<tool_response>\n{\"result\": 84}\n</tool_response>" in seen[1]  # the template rendered the result
    assert call in seen[1]  # and the call as the model wrote it


# --------------------------------------------------------------------------------------------
# LoRA files in either layout
# --------------------------------------------------------------------------------------------

def lora_args(save_dir, **overrides):
    return SimpleNamespace(**{**dict(load_from="model", save_dir=str(save_dir), weight="full_sft", hidden_size=64,
                                     use_moe=0, lora_weight="lora_identity"), **overrides})


def test_a_lora_file_is_found_in_either_layout(tmp_path):
    from inference.paths import resolve_paths
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    (out / "full_sft_64.pth").write_bytes(b"")
    (out / "full_sft_64_moe.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as error:  # neither: both places named
        resolve_paths(lora_args(out))
    assert f"{out / 'lora' / 'lora_identity_64.pth'} or {out / 'lora_identity_64.pth'}" in str(error.value)
    (out / "lora_identity_64.pth").write_bytes(b"")  # MiniMind's layout
    assert resolve_paths(lora_args(out))[1] == str(out / "lora_identity_64.pth")
    (out / "lora" / "lora_identity_64.pth").write_bytes(b"")  # this project's layout comes first
    assert resolve_paths(lora_args(out))[1] == str(out / "lora" / "lora_identity_64.pth")
    (out / "lora_medical_64_moe.pth").write_bytes(b"")  # MiniMind names a MoE model's LoRA with _moe
    medical = str(out / "lora_medical_64_moe.pth")
    assert resolve_paths(lora_args(out, use_moe=1, lora_weight="lora_medical"))[1] == medical
    assert resolve_paths(lora_args(out, lora_weight=medical))[1] == medical  # a path is taken as it is


def test_eval_llm_applies_a_lora_from_minimind_layout(tmp_path):
    """The whole way: a LoRA saved as out/{name}_{h}.pth is applied by eval_llm.py's loader."""
    from inference.chat_core import load_chat_model
    from inference.paths import resolve_paths
    from model.model_lora import apply_lora, save_lora
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    out = tmp_path / "out"
    out.mkdir()
    talkative_weight(out / "full_sft_64.pth")
    adapted = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))  # talkative_weight's layout
    apply_lora(adapted, rank=4)
    save_lora(adapted, str(out / "lora_identity_64.pth"))
    path, lora_path = resolve_paths(lora_args(out))
    chat = load_chat_model(path, lora_path, device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    assert chat.name == "full_sft_64+lora_identity_64"
    assert any(".lora." in name for name, _ in chat.model.named_parameters())
