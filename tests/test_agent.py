"""Agentic RL: multi-turn tool-use trajectories token in and token out (trainer/rl/agent.py), their rewards,
the agent_rl rows, and trainer/train_agent.py end to end."""
import json
import os

import pytest
import torch

from common.tokenizer import load_tokenizer
from conftest import REPO_ROOT, tiny_model
from dataset.lm_dataset import AgentRLDataset, DataError
from inference.tools import TOOLS
from common.chat import render
from trainer.rl.agent import Trajectory, pad_trajectories, run_trajectories, trajectory_logprobs
from trainer.rl.engines import TorchEngine
from trainer.rl.rewards import agent_reward, contains_answer

TOKENIZER = load_tokenizer()
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is 12*7?"}]


def char_by_char(text):
    """The text's ids, each character encoded on its own: the same text, but not the ids encoding it whole gives."""
    return [i for ch in text for i in TOKENIZER(ch, add_special_tokens=False).input_ids]


class ScriptedEngine:
    """Answers each context with the next scripted turn (ids), one log-prob per id; records what it was given."""

    def __init__(self, turns):
        self.turns, self.contexts = list(turns), []

    def generate(self, contexts, max_new_tokens):
        self.contexts.append([list(c) for c in contexts])
        out = []
        for _ in contexts:
            ids = self.turns.pop(0)[:max_new_tokens]
            out.append((ids, [-0.5 - 0.01 * k for k in range(len(ids))]))
        return out


def test_sampled_ids_are_kept_even_where_their_text_would_tokenise_differently():
    eos = TOKENIZER.eos_token_id
    call_ids = char_by_char(CALL) + [eos]
    assert call_ids[:-1] != TOKENIZER(CALL, add_special_tokens=False).input_ids  # re-encoding would change them
    answer_ids = TOKENIZER("12*7 = 84.", add_special_tokens=False).input_ids + [eos]
    engine = ScriptedEngine([call_ids, answer_ids])
    [t] = run_trajectories(engine, TOKENIZER, [QUESTION], [TOOLS], max_turns=3)

    assert t.calls == [[{"name": "calculator", "arguments": {"expression": "12*7"}}], []]
    assert json.loads(t.results[0][0]) == {"result": 84} and t.finished and not t.hit_turn_limit
    observation = t.ids[len(call_ids):len(t.ids) - len(answer_ids)]
    assert t.ids == call_ids + observation + answer_ids  # the sampled ids, untouched
    # the second turn was asked to continue exactly the trajectory so far
    assert engine.contexts[1] == [t.prompt_ids + call_ids + observation]
    # generated tokens (each turn's <|im_end|> included) carry the loss; the observation carries none
    assert t.loss_mask == [1] * len(call_ids) + [0] * len(observation) + [1] * len(answer_ids)
    assert t.sample_logps[len(call_ids):len(call_ids) + len(observation)] == [0.0] * len(observation)
    # the observation is the template's tool turn and the next generation prompt (thinking off: the template's
    # default, as the SFT data is rendered: no think block in this project's template)
    assert TOKENIZER.decode(observation) == ('\n<|im_start|>user\n<tool_response>\n{"result": 84}\n</tool_response>'
                                             '<|im_end|>\n<|im_start|>assistant\n')
    assert TOKENIZER.decode(t.prompt_ids) == render(TOKENIZER, QUESTION, TOOLS, generation_prompt=True)


def test_the_turn_limit_and_the_token_budget_end_a_trajectory():
    eos = TOKENIZER.eos_token_id
    call_ids = TOKENIZER(CALL, add_special_tokens=False).input_ids + [eos]
    [t] = run_trajectories(ScriptedEngine([call_ids, call_ids]), TOKENIZER, [QUESTION], [TOOLS], max_turns=2)
    assert t.hit_turn_limit and len(t.turns) == 2
    assert t.ids[-len(call_ids):] == call_ids  # no observation after the last allowed turn
    # a turn that reaches its budget without <|im_end|> is cut off: no call is read from it
    [t] = run_trajectories(ScriptedEngine([call_ids]), TOKENIZER, [QUESTION], [TOOLS], max_new_tokens=5)
    assert t.cut_off and t.calls == [[]] and len(t.ids) == 5
    # and so is one that reaches --max_total_len: each trajectory is held to its own room
    prompt = len(TOKENIZER(render(TOKENIZER, QUESTION, TOOLS, generation_prompt=True), add_special_tokens=False).input_ids)
    [t] = run_trajectories(ScriptedEngine([call_ids]), TOKENIZER, [QUESTION], [TOOLS], max_total_tokens=prompt + 3)
    assert t.cut_off and len(t.ids) == 3


def test_samples_step_through_the_turns_together():
    """Two prompts x two samples: one generate call per turn, over every trajectory still running."""
    eos = TOKENIZER.eos_token_id
    call_ids = TOKENIZER(CALL, add_special_tokens=False).input_ids + [eos]
    plain = TOKENIZER("84", add_special_tokens=False).input_ids + [eos]
    engine = ScriptedEngine([call_ids, plain, plain, call_ids, plain, plain])
    trajectories = run_trajectories(engine, TOKENIZER, [QUESTION, QUESTION], [TOOLS, TOOLS], samples_per_prompt=2)
    assert [len(c) for c in engine.contexts] == [4, 2]  # turn 1: all four; turn 2: the two that called a tool
    assert [len(t.turns) for t in trajectories] == [2, 1, 1, 2]


def test_the_engine_returns_the_log_probs_it_sampled_with():
    """TorchEngine's log-probs are those of the distribution each token was drawn from (temperature applied): a
    forward over the padded trajectory under the same weights gives them again, token for token."""
    torch.manual_seed(0)
    model = tiny_model(max_position_embeddings=2048).eval()
    engine = TorchEngine(model, TOKENIZER, temperature=0.7)
    trajectories = run_trajectories(engine, TOKENIZER, [QUESTION, [{"role": "user", "content": "你好"}]], [TOOLS, None],
                           samples_per_prompt=2, max_new_tokens=12)
    padded = pad_trajectories(trajectories, TOKENIZER.pad_token_id)
    with torch.no_grad():
        logps, _ = trajectory_logprobs(model, padded, temperature=0.7)
    mask = padded["loss_mask"].bool()
    assert mask.sum() == sum(sum(t.loss_mask) for t in trajectories) > 0
    assert torch.allclose(logps[mask], padded["sample_logps"][mask], atol=1e-4)
    assert (logps[~mask] == 0).all()


def test_pack_aligns_every_token_with_the_position_that_predicts_it():
    t = Trajectory(prompt_ids=[5, 6, 7], ids=[8, 9, 10], loss_mask=[1, 0, 1], sample_logps=[-1.0, 0.0, -3.0])
    padded = pad_trajectories([t, Trajectory(prompt_ids=[5, 6], ids=[8], loss_mask=[1], sample_logps=[-2.0])], pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 8, 0, 0, 0]]
    assert padded["loss_mask"].tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]  # position 2 predicts id 8
    assert padded["sample_logps"].tolist() == [[0, 0, -1.0, 0, -3.0], [0, -2.0, 0, 0, 0]]


def test_agent_reward_parts_by_hand():
    call = {"name": "calculator", "arguments": {"expression": "12*7"}}
    right = Trajectory([1], turns=[CALL, "12*7 = 84.0"], calls=[[call], []], results=[['{"result": 84}'], []])
    assert agent_reward(right, ["84"], TOOLS) == dict(total=2.5, success=1.0, answer=1.0, valid_calls=1.0,
                                                       unclosed=0.0, turn_limit=0.0, repetition=0.0)
    # a tool that was not offered, an unclosed tag, and an answer without the number
    wrong = Trajectory([1], turns=[CALL, "<tool_call> I think it is 48"], calls=[[call], []],
                       results=[['{"result": 84}'], []])
    parts = agent_reward(wrong, ["84"], [t for t in TOOLS if t["function"]["name"] != "calculator"])
    assert (parts["answer"], parts["valid_calls"], parts["unclosed"], parts["total"]) == (0.0, 0.0, 1.0, -0.5)
    # the turn limit: no final reply counts, and a penalty
    stuck = Trajectory([1], turns=[CALL], calls=[[call]], results=[['{"result": 84}']], hit_turn_limit=True)
    assert agent_reward(stuck, ["84"], TOOLS)["total"] == 0.5 * 1.0 - 0.5
    assert contains_answer("约 1,234.0 元", "1234") and not contains_answer("12345", "1234")
    assert contains_answer("It is a THURSDAY.", "Thursday")
    echo = Trajectory([1], turns=["a b c a b c a b c"], calls=[[]], results=[[]])
    assert agent_reward(echo, [], None)["repetition"] > 0


def test_agent_rows_load_upstream_and_demo_layouts(tmp_path):
    tools = json.dumps(TOOLS[:1], ensure_ascii=False)
    upstream = {"conversations": [{"role": "system", "content": "你是助手", "tools": tools},
                                  {"role": "user", "content": "12*7?"}, {"role": "assistant", "content": "84"}],
                "gt": [84]}
    path = tmp_path / "agent.jsonl"
    path.write_text(json.dumps(upstream, ensure_ascii=False) + "\n", encoding="utf-8")
    [row] = AgentRLDataset(str(path)).rows
    assert row["tools"] == TOOLS[:1] and row["gt"] == ["84"]
    assert [m["role"] for m in row["messages"]] == ["system", "user"] and "tools" not in row["messages"][0]
    demo = AgentRLDataset(os.path.join(REPO_ROOT, "dataset", "demo", "agent_rl_eval.jsonl"))
    assert len(demo) > 50 and all(r["gt"] and r["tools"] for r in demo.rows)
    path.write_text(json.dumps(upstream) + "\n" + json.dumps({"conversations": [], "gt": "84"}) + "\n")
    with pytest.raises(DataError, match=r"agent.jsonl:2: .*gt"):
        AgentRLDataset(str(path))
    assert len(AgentRLDataset(str(path), on_bad_line="skip")) == 1


def test_the_demo_tasks_gt_comes_from_the_tools_real_results():
    from inference.tools import run_tool
    rows = [json.loads(line) for line in open(os.path.join(REPO_ROOT, "dataset", "demo", "agent_rl.jsonl"),
                                                  encoding="utf-8")]
    tools_rows = {json.dumps(r["conversations"][0], ensure_ascii=False): r for r in
                  map(json.loads, open(os.path.join(REPO_ROOT, "dataset", "demo", "tools.jsonl"), encoding="utf-8"))}
    for row in rows[:40]:
        call = tools_rows[json.dumps(row["conversations"][0], ensure_ascii=False)]["call"]
        assert row["gt"][0] in [str(v) for v in json.loads(run_tool(call["name"], call["arguments"])).values()]


def test_train_agent_updates_several_times_per_rollout_and_stops_on_kl(tmp_path):
    """--ppo_epochs 3: three updates on each rollout batch, the ratio pi / pi_sample leaving 1; --kl_stop with a tiny
    bound keeps only the first update of a batch. A stopped run resumes to the uninterrupted run's metrics."""
    from test_train import metrics, run_script
    common = ["--num_generations", "2", "--max_gen_len", "24", "--learning_rate", "1e-2", "--from_weight", "none",
              "--batch_size", "2", "--log_interval", "1"]
    run_script("train_agent.py", *common, "--ppo_epochs", "3", "--max_steps", "2", tmp=tmp_path / "a")
    rows = metrics(tmp_path / "a", "agent_64_metrics.jsonl")
    assert [r["updates"] for r in rows] == [3, 3]
    assert abs(rows[-1]["ratio"] - 1) > 1e-4 and rows[-1]["kl_to_sampler"] > 0
    assert all(k in rows[0] for k in ("reward", "answer", "valid_calls", "unclosed", "turn_limit", "repetition",
                                      "success", "kl"))
    run_script("train_agent.py", *common, "--ppo_epochs", "3", "--kl_stop", "1e-12", "--max_steps", "2",
               tmp=tmp_path / "b")
    stopped = metrics(tmp_path / "b", "agent_64_metrics.jsonl")
    assert [r["updates"] for r in stopped][-1] == 1
    # the loss logged is that of the update applied (the first), not of the second, computed and discarded
    run_script("train_agent.py", *common, "--ppo_epochs", "1", "--max_steps", "1", tmp=tmp_path / "d")
    assert stopped[0]["loss"] == metrics(tmp_path / "d", "agent_64_metrics.jsonl")[0]["loss"]
    # stopped after step 1 and resumed: the same rollouts (the sampling RNG is restored) and the same updates
    run_script("train_agent.py", *common, "--ppo_epochs", "3", "--max_steps", "1", tmp=tmp_path / "c")
    run_script("train_agent.py", *common, "--ppo_epochs", "3", "--max_steps", "2", "--from_resume", "1",
               tmp=tmp_path / "c")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "c", "agent_64_metrics.jsonl")) == strip(rows)


# -- Hardening: tools that fail, the prompt's open <think>, answers that spray, settings that must act --------------
MINIMIND3_STYLE_TEMPLATE = (  # minimind-3's generation prompt: <think> opened with open_thinking, else an empty block
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if open_thinking is defined and open_thinking is true %}{{- '<think>\\n' }}"
    "{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def minimind3_style_tokenizer():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = MINIMIND3_STYLE_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("expression", ["999999.0**64", "((-1)**0.5)%2"])
def test_a_tool_that_fails_is_an_invalid_call_the_model_sees_not_the_end_of_the_run(expression):
    eos = TOKENIZER.eos_token_id
    call = CALL.replace("12*7", expression)
    call_ids = TOKENIZER(call, add_special_tokens=False).input_ids + [eos]
    answer_ids = TOKENIZER("84", add_special_tokens=False).input_ids + [eos]
    [t] = run_trajectories(ScriptedEngine([call_ids, answer_ids]), TOKENIZER, [QUESTION], [TOOLS], max_turns=3)
    assert "error" in json.loads(t.results[0][0]) and len(t.turns) == 2  # the trajectory went on after it
    assert "error" in TOKENIZER.decode(t.ids[len(call_ids):len(t.ids) - len(answer_ids)])  # the model reads it
    assert agent_reward(t, ["84"], TOOLS)["valid_calls"] == 0.0


def test_the_think_block_the_prompt_opened_is_not_an_unclosed_tag():
    """minimind-3's template opens <think> in the generation prompt: a turn that closes it is balanced, and its
    answer is what follows </think>; a turn that never closes it has given no answer."""
    tokenizer = minimind3_style_tokenizer()
    eos = tokenizer.eos_token_id
    turn = tokenizer("12 times 7.\n</think>\n\n84", add_special_tokens=False).input_ids + [eos]
    [t] = run_trajectories(ScriptedEngine([turn]), tokenizer, [QUESTION], [None], thinking_ratio=1.0)
    assert t.thinking and t.opened_think == [True]
    parts = agent_reward(t, ["84"], None)
    assert (parts["unclosed"], parts["answer"], parts["success"]) == (0.0, 1.0, 1.0)
    still_thinking = tokenizer("the answer might be 84", add_special_tokens=False).input_ids + [eos]
    [t] = run_trajectories(ScriptedEngine([still_thinking]), tokenizer, [QUESTION], [None], thinking_ratio=1.0)
    parts = agent_reward(t, ["84"], None)
    assert (parts["unclosed"], parts["answer"]) == (1.0, 0.0)
    # thinking off: the template's empty think block is closed in the prompt itself
    [t] = run_trajectories(ScriptedEngine([tokenizer("84", add_special_tokens=False).input_ids + [eos]]), tokenizer,
                  [QUESTION], [None])
    assert t.opened_think == [False] and agent_reward(t, ["84"], None)["total"] == 2.0


def reply(text):
    return Trajectory([1], turns=[text], calls=[[]], results=[[]])


def test_an_answer_that_lists_candidates_does_not_score():
    spray = " ".join(str(n) for n in range(200))
    assert agent_reward(reply(spray), ["84"], None)["answer"] == 0.0  # it named 199 last
    weekdays = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday"
    assert agent_reward(reply(weekdays), ["Thursday"], None)["answer"] == 0.0
    assert agent_reward(reply("星期一、星期二、星期四"), ["星期四"], None)["answer"] == 0.0
    # one stated answer scores, the question's numbers restated before it included
    for text, gt in [("12*7 = 84.0", ["84"]), ("95 加 6 等于 101。", ["101"]), ("1,234 元", ["1234"]),
                     ("2024-03-01 is a Friday.", ["Friday"]), ("<answer>\n84\n</answer>", ["84"]),
                     ("25°C and 7.2", ["7.2", "25"]), ("<answer>84</answer> (not 85)", ["84"])]:
        assert agent_reward(reply(text), gt, None)["success"] == 1.0, text
    assert agent_reward(reply("84 or maybe 85"), ["84"], None)["answer"] == 0.0


def test_thinking_ratio_acts_or_is_refused(tmp_path):
    from test_train import run_script
    from common.chat import has_thinking_switch
    assert has_thinking_switch(minimind3_style_tokenizer()) and not has_thinking_switch(TOKENIZER)
    prompts = {render(minimind3_style_tokenizer(), QUESTION, None, thinking or None, generation_prompt=True)
               for thinking in (True, False)}
    assert len(prompts) == 2
    result = run_script("train_agent.py", "--from_weight", "none", "--thinking_ratio", "0.5", "--max_steps", "1",
                        tmp=tmp_path, check=False)
    assert result.returncode != 0 and "has no thinking switch" in result.stderr


def test_prompts_too_long_are_skipped_and_cut_off_trajectories_can_be_masked(tmp_path):
    """A prompt longer than --max_total_len gives no trajectory to train on: skipped and counted, no update. With
    --mask_truncated cut-off trajectories carry no loss; with --dynamic_sampling groups whose rewards are all equal are
    drawn again, then dropped; the loss aggregations all run."""
    from test_train import metrics, run_script
    [t] = run_trajectories(ScriptedEngine([]), TOKENIZER, [QUESTION], [TOOLS], max_total_tokens=10)
    assert t.prompt_too_long and t.ids == [] and t.turns == []  # the engine was not even asked
    common = ["--num_generations", "2", "--from_weight", "none", "--batch_size", "2", "--max_steps", "1"]
    run_script("train_agent.py", *common, "--max_total_len", "16", tmp=tmp_path / "long")
    [row] = metrics(tmp_path / "long", "agent_64_metrics.jsonl")
    assert row["skipped_prompts"] == 4 and row["updates"] == 0 and "loss" not in row
    run_script("train_agent.py", *common, "--max_gen_len", "3", "--mask_truncated", "1", "--loss_agg", "token",
               tmp=tmp_path / "masked")
    [row] = metrics(tmp_path / "masked", "agent_64_metrics.jsonl")
    assert row["masked_truncated"] == 4 and row["updates"] == 0  # three random tokens never reach <|im_end|>
    run_script("train_agent.py", *common, "--max_gen_len", "3", "--dynamic_sampling", "2", "--loss_agg", "sequence",
               tmp=tmp_path / "dynamic")
    [row] = metrics(tmp_path / "dynamic", "agent_64_metrics.jsonl")
    assert row["redrawn_groups"] == 4 and row["dropped_groups"] == 2 and row["updates"] == 0  # cut off: all 0
    run_script("train_agent.py", *common, "--max_gen_len", "6", "--loss_agg", "sequence", tmp=tmp_path / "sequence")
    [row] = metrics(tmp_path / "sequence", "agent_64_metrics.jsonl")
    assert row["updates"] == 1 and row["loss"] == row["loss"]  # finite


# -- MiniMind's own agent data: its six tools answer, a right call and answer earn the full reward ------------------
from inference.tools import AGENT_TOOLS, load_tools  # noqa: E402

# (request, the call that answers it, a right final answer, a wrong one, gt) - gt as the tools' results give it
UPSTREAM_TASKS = [
    ("帮我算一下 256 乘以 37 等于多少", {"name": "calculate_math", "arguments": {"expression": "256 * 37"}},
     "256 × 37 = 9472。", "256 × 37 = 9462。", ["9472"]),
    ("帮我把100公里换算成英里", {"name": "unit_converter", "arguments": {"value": 100, "from_unit": "km",
                                                                  "to_unit": "miles"}},
     "100公里约等于62.1371英里。", "100公里约等于160.934英里。", ["62.1371"]),
    ("北京今天天气怎么样？", {"name": "get_current_weather", "arguments": {"location": "北京"}},
     "北京今天天气晴，气温28°C。", "北京今天多云，气温22°C。", ["28°C", "晴"]),
    ("纽约现在几点了？", {"name": "get_current_time", "arguments": {"timezone": "America/New_York"}},
     "纽约现在是 2025-03-07 01:30:00。", "纽约现在是 2025-03-07 14:30:00。", ["01:30"]),
    ("查一下美元兑人民币汇率", {"name": "get_exchange_rate", "arguments": {"from_currency": "USD",
                                                                   "to_currency": "CNY"}},
     "1美元约兑换7.21人民币。", "1美元约兑换7.85人民币。", ["7.21"]),
    ("把'你好世界'翻译成英文", {"name": "translate_text", "arguments": {"text": "你好世界",
                                                                "target_language": "english"}},
     "“你好世界”的英文是 Hello World。", "“你好世界”的英文是 Hi there。", ["Hello World"]),
]


def upstream_row(request, gt, tools=AGENT_TOOLS):
    """A row as MiniMind's agent_rl.jsonl has them: the tools as a JSON string on the system message."""
    return {"conversations": [{"role": "system", "content": "你是一个有用的助手。",
                               "tools": json.dumps(tools, ensure_ascii=False)},
                              {"role": "user", "content": request}, {"role": "assistant", "content": "参考回答"}],
            "gt": gt}


def turn_ids(text):
    return TOKENIZER(text, add_special_tokens=False).input_ids + [TOKENIZER.eos_token_id]


def call_text(*calls):
    return "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)


@pytest.mark.parametrize("request_, call, right, wrong, gt", UPSTREAM_TASKS, ids=[t[1]["name"] for t in UPSTREAM_TASKS])
def test_a_right_call_and_answer_on_minimind_agent_rows_earn_the_full_reward(tmp_path, request_, call, right, wrong,
                                                                             gt):
    path = tmp_path / "agent_rl.jsonl"
    path.write_text(json.dumps(upstream_row(request_, gt), ensure_ascii=False) + "\n", encoding="utf-8")
    [row] = AgentRLDataset(str(path)).rows
    assert row["tools"] == AGENT_TOOLS
    # both trajectories call the tool in turn 1 (one generate over both), then answer in turn 2: one right, one wrong
    engine = ScriptedEngine([turn_ids(call_text(call))] * 2 + [turn_ids(right), turn_ids(wrong)])
    good, bad = run_trajectories(engine, TOKENIZER, [row["messages"]] * 2, [row["tools"]] * 2)
    result = json.loads(good.results[0][0])
    assert "error" not in result and any(str(v) in right or str(v) in gt for v in result.values())  # answer from it
    assert agent_reward(good, row["gt"], row["tools"]) == dict(total=2.5, success=1.0, answer=1.0, valid_calls=1.0,
                                                                unclosed=0.0, turn_limit=0.0, repetition=0.0)
    parts = agent_reward(bad, row["gt"], row["tools"])
    assert parts["success"] == 0.0 and parts["total"] < 2.5 and parts["valid_calls"] == 1.0


def test_two_calls_in_one_turn_and_a_call_to_a_tool_not_offered():
    """Two of MiniMind's tools in one turn, both answered; calling a tool the row does not offer is invalid even
    where a tool of that name exists."""
    weather, units = UPSTREAM_TASKS[2][1], UPSTREAM_TASKS[1][1]
    row = AgentRLDataset.parse(json.dumps(upstream_row("北京天气如何？再把100公里换算成英里", ["28°C", "62.1371"])))
    answer = "北京今天28°C，晴；100公里约等于62.1371英里。"
    [t] = run_trajectories(ScriptedEngine([turn_ids(call_text(weather, units)), turn_ids(answer)]), TOKENIZER,
                           [row["messages"]], [row["tools"]])
    assert [json.loads(r) for r in t.results[0]] == [
        {"city": "北京", "temperature": "28°C", "humidity": "65%", "condition": "晴"}, {"result": 62.1371}]
    assert agent_reward(t, row["gt"], row["tools"])["total"] == 2.5
    offered = [s for s in AGENT_TOOLS if s["function"]["name"] != "unit_converter"]
    assert agent_reward(t, row["gt"], offered)["valid_calls"] == 0.5


def test_a_tool_module_answers_the_calls_of_a_trajectory(tmp_path, monkeypatch):
    """--tools package.module: its tools run in the rollouts; train_agent names the data's tools no tool answers."""
    from trainer.train_agent import unanswered_tools
    (tmp_path / "agent_plugin_tools.py").write_text(
        'TOOLS = [{"type": "function", "function": {"name": "stock_price", "parameters": {"type": "object", '
        '"properties": {"symbol": {"type": "string"}}}}}]\n'
        'def call(name, arguments):\n    return {"symbol": arguments["symbol"], "price": 123.5}\n', encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    toolset = load_tools("agent_plugin_tools")
    schema = toolset.schemas[0]
    call = {"name": "stock_price", "arguments": {"symbol": "ACME"}}
    engine = ScriptedEngine([turn_ids(call_text(call)), turn_ids("ACME 的股价是 123.5。")])
    [t] = run_trajectories(engine, TOKENIZER, [QUESTION], [[schema]], toolset=toolset)
    assert json.loads(t.results[0][0]) == {"symbol": "ACME", "price": 123.5}
    assert agent_reward(t, ["123.5"], [schema])["total"] == 2.5
    [t] = run_trajectories(ScriptedEngine([turn_ids(call_text(call)), turn_ids("123.5")]), TOKENIZER, [QUESTION],
                           [[schema]])  # without the module: an error result, an invalid call
    assert "no tool named 'stock_price'" in t.results[0][0]
    rows = [{"tools": [schema]}, {"tools": AGENT_TOOLS + [schema]}, {"tools": []}]
    assert unanswered_tools(rows, load_tools(None)) == {"stock_price": 2} and not unanswered_tools(rows, toolset)


class StandInRewardModel:
    """RewardModel's interface (score: conversations ending in the answer -> clipped scores), without a model: the
    score is fixed, and what it was asked is kept."""

    def __init__(self, score):
        self.value, self.asked = score, []

    def score(self, conversations):
        self.asked += conversations
        return torch.full((len(conversations),), float(self.value)).clamp(-3.0, 3.0)


@pytest.mark.parametrize("score", [1.5, -2.0, 9.0])
def test_the_reward_model_scores_answers_given_without_a_tool_call(score):
    """--reward_model_path (MiniMind's term): a trajectory that answers without calling a tool gets the reward
    model's clipped score added, then the total is clipped to [-3, 3]; a trajectory that called a tool is judged by
    its gt and calls alone. Through train_agent.draw, as the trainer calls it."""
    from types import SimpleNamespace
    from trainer.train_agent import draw
    args = SimpleNamespace(num_generations=2, max_turns=3, max_gen_len=64, max_total_len=2500)
    batch = {"messages": [QUESTION], "tools": [TOOLS], "gt": [["84"]]}
    scripted = [turn_ids("<think>\n12 乘 7\n</think>\n84"), turn_ids(CALL), turn_ids("12*7 = 84")]
    judge = StandInRewardModel(score)
    [direct, called], [with_model, tool_parts] = draw(ScriptedEngine(scripted), TOKENIZER, [0], batch, args, 0.0,
                                                      reward_model=judge)
    assert judge.asked == [QUESTION + [{"role": "assistant", "content": "84"}]]  # the answer after its thinking
    clipped = max(-3.0, min(3.0, score))
    assert with_model["model"] == clipped and with_model["total"] == max(-3.0, min(3.0, 2.0 + clipped))
    assert tool_parts["model"] == 0.0 and tool_parts["total"] == 2.5
    [_, _], [without_model, _] = draw(ScriptedEngine(scripted), TOKENIZER, [0], batch, args, 0.0)
    assert "model" not in without_model and without_model["total"] == 2.0
