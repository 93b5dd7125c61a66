"""RL stages: rollouts, rewards, the GRPO / PPO / SPO maths on hand-worked examples, and each script end to end."""
import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from conftest import REPO_ROOT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from test_train import metrics, run_script

from trainer.rl import rewards
from trainer.rl import sampling
from trainer import losses
from trainer import train_ppo
from trainer import train_spo
from trainer.rl.engines import TorchEngine

MODEL_DIR = os.path.join(REPO_ROOT, "model")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def small_model(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------

def test_prompts_are_cut_from_the_left_and_left_padded(tok):
    long_prompt = tok.apply_chat_template([{"role": "user", "content": "很长的问题" * 50}], tokenize=False,
                                          add_generation_prompt=True)
    ids, mask = sampling.encode_prompts(tok, [long_prompt, "短"], max_length=20, device="cpu")
    assert ids.shape == (2, 20)
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")  # the generation prompt survives
    assert mask[1].tolist() == [0] * 19 + [1] and ids[1, 0] == tok.pad_token_id


class ScriptedEngine:
    """A rollout engine that answers the given (ids, log-probs) and records what it was asked."""
    temperature = 0.7

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def generate(self, contexts, max_new_tokens):
        self.asked.append((contexts, max_new_tokens))
        return self.answers[:len(contexts)]


def test_a_rollout_holds_each_answer_up_to_its_eos_and_the_engines_log_probs(tok):
    eos = tok.eos_token_id
    engine = ScriptedEngine([([5, 6, eos], [-0.5, -1.0, -0.1]), ([7, 8, 9, 10], [-2.0, -0.2, -0.3, -0.4])])
    batch = sampling.sample(engine, tok, ["问题"], max_prompt_length=64, max_new_tokens=4, samples_per_prompt=2)
    (contexts, max_new_tokens), = engine.asked
    assert contexts == [tok("问题").input_ids] * 2 and max_new_tokens == 4  # G copies of the prompt, adjacent
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.input_ids[0, batch.prompt_length:].tolist() == [5, 6, eos, tok.pad_token_id]
    assert torch.equal(batch.sample_logps, torch.tensor([[-0.5, -1.0, -0.1, 0.0], [-2.0, -0.2, -0.3, -0.4]]))
    assert batch.attention_mask[:, batch.prompt_length:].tolist() == batch.completion_mask.tolist()
    assert batch.texts[1] == tok.decode([7, 8, 9, 10]) and batch.temperature == 0.7


def test_log_probs_do_not_depend_on_padding(tok):
    model = small_model()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("一个比较长的问题，需要更多的 token？", "短？")]
    torch.manual_seed(0)
    batch = sampling.sample(TorchEngine(model, tok), tok, prompts, 64, 8, samples_per_prompt=2)
    width = batch.completion_mask.shape[1]
    assert batch.input_ids.shape[0] == 4 and width <= 8
    together, _ = sampling.completion_logprobs(model, batch)
    # the in-process engine's log-probs are the policy's own (temperature 1)
    assert torch.allclose(batch.sample_logps, together, atol=1e-4)
    # the short prompt's answers scored without any left padding
    alone_ids = batch.input_ids[2:][:, batch.attention_mask[2, :batch.prompt_length].argmax():]
    alone = sampling.Rollout(alone_ids, batch.attention_mask[2:, -alone_ids.shape[1]:], batch.completion_mask[2:],
                            alone_ids.shape[1] - width, batch.texts[2:])
    assert torch.allclose(sampling.completion_logprobs(model, alone)[0], together[2:], atol=1e-5)
    assert (together[batch.completion_mask == 0] == 0).all()


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>\n想一想\n</think>\n<answer>\n42\n</answer>", 1.5),     # exact layout + 4 tags once each
    ("<think>想</think><answer>42</answer>", 1.0),                   # tags once each, not the exact layout
    ("<think>\n想\n</think>\n42", 0.5),                              # two tags
    ("<think><think>\n</think>\n<answer>\n1\n</answer>", 0.75),     # <think> twice: no exact layout, 3 tags
    ("just text", 0.0),
])
def test_format_reward(text, expected):
    assert rewards.format_reward(text) == pytest.approx(expected)


def test_answer_reward():
    assert rewards.answer_reward("<think>\n算\n</think>\n<answer>\n 42。\n</answer>", ["42"]) == 1.0
    assert rewards.answer_reward("黄河入海流", ["黄河入海流"]) == 1.0
    assert rewards.answer_reward("<answer>41</answer>", ["42"]) == 0.0
    assert rewards.answer_reward("anything", []) == 0.0
    got = rewards.rule_rewards(["<think>\nx\n</think>\n<answer>\n42\n</answer>", "42"], [{"answers": ["42"]}] * 2, True)
    assert got.tolist() == [2.5, 1.0]


def save_reward_model(folder, tok, scale=1.0):
    """A tiny randomly initialised sequence-classification reward model, saved where a test can load it."""
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=1, num_labels=1, pad_token_id=0))
    with torch.no_grad():
        model.score.weight.mul_(scale)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_scores_in_batches_and_clips(tmp_path, tok):
    conversations = [[{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "回答" * (i + 1)}]
                     for i in range(5)]
    scorer = rewards.RewardModel(str(save_reward_model(tmp_path / "rm", tok)), "cpu", batch_size=2)
    scores = scorer.score(conversations)
    alone = torch.cat([scorer.score([c]) for c in conversations])
    assert scores.shape == (5,) and torch.allclose(scores, alone, atol=1e-4)  # batching (padding) changes nothing
    loud = rewards.RewardModel(str(save_reward_model(tmp_path / "loud", tok, scale=1e4)), "cpu")
    assert loud.score(conversations).abs().max() == 3.0  # clipped to +-3


# --------------------------------------------------------------------------------------------
# The maths, by hand
# --------------------------------------------------------------------------------------------

def test_group_advantages():
    # group 1: [1, 0, 0, 0] -> mean 0.25, sample std 0.5;  group 2: all equal -> 0
    got = losses.group_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]), 4)
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_clipped_objective_and_k3():
    logps, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    # token 1: ratio 1.5, A = 1  -> -min(1.5, 1.2)  = -1.2;   token 2: ratio 0.5, A = 1 -> -min(0.5, 0.8) = -0.5
    assert losses.clipped_objective(logps, old, torch.tensor([1.0]), 0.2).flatten().tolist() == \
        pytest.approx([-1.2, -0.5])
    # with A = -1: token 1 -> -min(-1.5, -1.2) = 1.5;  token 2 -> -min(-0.5, -0.8) = 0.8
    assert losses.clipped_objective(logps, old, torch.tensor([-1.0]), 0.2).flatten().tolist() == \
        pytest.approx([1.5, 0.8])
    # k3 with ref - logp = log 2: 2 - log 2 - 1
    assert losses.k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(1 - math.log(2))
    assert losses.k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


def test_cispo_objective_by_hand():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    # weights min(rho, 1.28) taken as constants: 1.28, 0.5 (no lower bound), 1.1; loss_t = -w_t A logp_t
    loss = losses.cispo_objective(logps, old, torch.tensor([2.0]), 0.28)
    expected = [-1.28 * 2 * math.log(1.5), -0.5 * 2 * math.log(0.5), -1.1 * 2 * math.log(1.1)]
    assert loss.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    # d loss_t / d logp_t = -w_t A: every token keeps a gradient, the clipped one included
    assert logps.grad.flatten().tolist() == pytest.approx([-2.56, -1.0, -2.2], rel=1e-6)
    # PPO-clip gives the clipped token (ratio 1.5 > 1.2 with A > 0) no gradient at all
    clipped = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    losses.clipped_objective(clipped, old, torch.tensor([2.0]), 0.2).sum().backward()
    assert clipped.grad.flatten().tolist() == pytest.approx([0.0, -1.0, -2.2], rel=1e-6)
    # on-policy (rho = 1, one update per rollout, as train_grpo.py does) the two gradients are the same
    a, b = torch.tensor([[-0.3, -2.0]], requires_grad=True), torch.tensor([[-0.3, -2.0]], requires_grad=True)
    losses.cispo_objective(a, a.detach(), torch.tensor([-0.7]), 0.28).sum().backward()
    losses.clipped_objective(b, b.detach(), torch.tensor([-0.7]), 0.2).sum().backward()
    assert torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("objective", ["grpo", "cispo"])
@pytest.mark.parametrize("advantage", [-1.0, 1.0])
def test_a_sampler_log_prob_of_minus_infinity_gives_a_bounded_loss_and_gradient(objective, advantage):
    """vLLM writes -inf as -9999: rho = exp(logp + 9999) overflows. The dual clip bounds PPO-clip's loss for A < 0
    at c |A| (without it: inf, and nan gradients); CISPO's weight is capped; the log-ratio is clamped first."""
    logps = torch.tensor([[-2.0, -0.5]], requires_grad=True)
    sampled = torch.tensor([[-9999.0, -0.5]])
    if objective == "grpo":
        loss = losses.clipped_objective(logps, sampled, torch.tensor([advantage]), 0.2)
    else:
        loss = losses.cispo_objective(logps, sampled, torch.tensor([advantage]), 5.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all()
    if objective == "grpo":
        # token 1: A > 0 -> -(1 + eps) A (clipped, no gradient); A < 0 -> -c A = 3 (dual clip, no gradient)
        assert loss[0, 0].item() == pytest.approx(-1.2 if advantage > 0 else 3.0) and logps.grad[0, 0] == 0
        assert loss[0, 1].item() == pytest.approx(-advantage)  # rho = 1 on the other token
    else:
        assert loss[0, 0].item() == pytest.approx(-6.0 * advantage * -2.0)  # weight capped at 1 + eps_high
    # the dual clip changes nothing while rho <= c
    ratios = torch.log(torch.tensor([[0.5, 1.0, 2.9]]))
    assert losses.clipped_objective(ratios, torch.zeros(1, 3), torch.tensor([-1.0]), 0.2).flatten().tolist() == \
        pytest.approx([0.8, 1.0, 2.9])


def test_gae_by_hand():
    token_rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer has two tokens
    advantages, returns = train_ppo.gae(token_rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: A2 = 1 - 0.5 = 0.5; A1 = (0 + 0.5 - 0.5) + 0.95 * 0.5 = 0.475; A0 = 0 + 0.95 * 0.475 = 0.45125
    # row 2: A1 = 2 + 0 - 1 = 1 (nothing after the last token); A0 = (0 + 1 - 1) + 0.95 * 1 = 0.95
    assert advantages.flatten().tolist() == pytest.approx([0.45125, 0.475, 0.5, 0.95, 1.0, 0.0])
    assert returns.flatten().tolist() == pytest.approx([0.95125, 0.975, 1.0, 1.95, 2.0, 0.0])


def test_ppo_token_rewards_put_the_answer_reward_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old, ref = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]]), torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -1.0, -2.0]])
    got = train_ppo.token_rewards(torch.tensor([3.0, -1.0]), old, ref, mask, kl_coef=0.1)
    assert got.flatten().tolist() == pytest.approx([-0.05, 3.0, 0.0, 0.0, 0.0, -1.1])


def test_spo_tracker_update_by_hand():
    tracker = train_spo.BetaTracker()
    assert tracker.baseline() == 0.5
    assert tracker.update(mean_reward=1.0, mean_logp=-2.0) == 0.96       # no drift yet: rho = min(1, 0.96)
    assert (tracker.alpha, tracker.beta) == pytest.approx((1.96, 0.96))
    assert tracker.update(mean_reward=0.0, mean_logp=-2.06) == pytest.approx(0.5)  # drift 0.06 -> 2^-1
    assert (tracker.alpha, tracker.beta) == pytest.approx((0.98, 1.48))
    assert tracker.update(mean_reward=0.5, mean_logp=-2.0 - 0.06 - 0.03) == pytest.approx(max(2 ** -0.5, 0.5))
    restored = train_spo.BetaTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.baseline() == tracker.baseline() and restored.last_logp == tracker.last_logp
    assert train_spo.rescale(torch.tensor([-1.0, 1.25, 4.0]), 0.0, 2.5).tolist() == [0.0, 0.5, 1.0]


# --------------------------------------------------------------------------------------------
# The scripts end to end
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("rl")
    torch.save({k: v.half() for k, v in small_model(3).state_dict().items()}, root / "start.pth")
    save_reward_model(root / "rm", tok)  # unscaled: scores vary inside the +-3 clip
    return root


RL_ARGS = ["--max_gen_len", "12", "--batch_size", "2", "--accumulation_steps", "1", "--reasoning", "0",
           "--from_weight", "full_sft", "--dtype", "float32", "--learning_rate", "1e-3"]


@pytest.mark.parametrize("script, name, extra", [
    ("train_grpo.py", "grpo_64", ["--num_generations", "3"]),
    ("train_grpo.py", "grpo_64", ["--num_generations", "3", "--loss_type", "cispo"]),
    ("train_grpo.py", "grpo_64", ["--num_generations", "3", "--ppo_epochs", "2"]),
    ("train_ppo.py", "ppo_actor_64", ["--critic_learning_rate", "1e-3", "--update_old_actor_freq", "1"]),
    ("train_ppo.py", "ppo_actor_64", ["--gae", "0"]),
    ("train_spo.py", "spo_64", []),
])
def test_rl_script_trains_and_resumes_exactly(tmp_path, rl_setup, script, name, extra):
    args = RL_ARGS + extra + ["--reward_model_path", str(rl_setup / "rm")]
    for run in ("straight", "resumed"):
        (tmp_path / run / "out").mkdir(parents=True)
        (tmp_path / run / "out" / "full_sft_64.pth").write_bytes((rl_setup / "start.pth").read_bytes())
    run_script(script, *args, "--max_steps", "3", tmp=tmp_path / "straight")
    run_script(script, *args, "--max_steps", "2", tmp=tmp_path / "resumed")
    run_script(script, *args, "--max_steps", "3", "--from_resume", "1", tmp=tmp_path / "resumed")
    straight = metrics(tmp_path / "straight", f"{name}_metrics.jsonl")
    resumed = metrics(tmp_path / "resumed", f"{name}_metrics.jsonl")
    assert len(straight) == 3 and all(m["grad_norm"] > 0 for m in straight)  # real gradients every step
    assert all(m["tokens_per_s"] > 0 for m in straight)
    drop = ("time", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in straight] == \
        [{k: v for k, v in m.items() if k not in drop} for m in resumed]
    start = torch.load(rl_setup / "start.pth", weights_only=True)
    trained = torch.load(tmp_path / "straight" / "out" / f"{name}.pth", weights_only=True)
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    state = torch.load(tmp_path / "resumed" / "ckpt" / f"{name}_resume.pth", weights_only=True)
    if script == "train_ppo.py":
        assert {"critic", "critic_optimizer", "old_actor"} <= set(state["extras"])
    if script == "train_spo.py":
        assert set(state["extras"]["tracker"]) == {"alpha", "beta", "last_logp"}


@pytest.mark.parametrize("script, name, extra", [
    ("train_grpo.py", "grpo_64_moe", ["--num_generations", "2"]),
    ("train_ppo.py", "ppo_actor_64_moe", []),
    ("train_spo.py", "spo_64_moe", []),
])
def test_moe_router_keeps_its_balancing_loss_in_rl(tmp_path, script, name, extra):
    """With --use_moe 1 the trained forward's load-balancing loss is part of the step's loss (logged as
    aux_loss, the share that went into the backward): without it the router would train unbalanced."""
    args = [a for a in RL_ARGS if a != "full_sft"]
    args[args.index("--from_weight") + 1:args.index("--from_weight") + 1] = ["none"]
    run_script(script, *args, *extra, "--use_moe", "1", "--max_steps", "2", tmp=tmp_path)
    rows = metrics(tmp_path, f"{name}_metrics.jsonl")
    assert len(rows) == 2 and all(row["aux_loss"] > 0 for row in rows)


def test_grpo_updates_several_times_per_rollout_and_stops_on_kl(tmp_path, rl_setup):
    """--ppo_epochs 3: three updates on each rollout batch against the policy that sampled, so the logged ratio
    leaves 1; --kl_stop with a tiny bound keeps only the first update of a batch."""
    for run, extra in (("epochs", []), ("stopped", ["--kl_stop", "1e-12"])):
        (tmp_path / run / "out").mkdir(parents=True)
        (tmp_path / run / "out" / "full_sft_64.pth").write_bytes((rl_setup / "start.pth").read_bytes())
        run_script("train_grpo.py", *RL_ARGS, "--num_generations", "2", "--ppo_epochs", "3", "--learning_rate", "1e-2",
                   "--max_steps", "2", *extra, tmp=tmp_path / run)
    rows = metrics(tmp_path / "epochs", "grpo_64_metrics.jsonl")
    assert [r["updates"] for r in rows] == [3, 3]
    assert all(abs(r["ratio"] - 1) > 1e-5 and r["kl_to_old"] > 0 for r in rows)
    # (at step 1 the policy is still the reference and every reward 0: the first update moves it by weight decay only)
    updates = [r["updates"] for r in metrics(tmp_path / "stopped", "grpo_64_metrics.jsonl")]
    assert max(updates) < 3 and updates[-1] == 1


def test_ppo_updates_several_times_per_rollout_and_stops_on_kl(tmp_path, rl_setup):
    """--ppo_epochs 3 (upstream's --ppo_update_iters): actor and critic updated three times on each rollout batch
    against the pi_old, reference and values taken before the first; --kl_stop (--early_stop_kl) with a tiny bound
    keeps only the first update."""
    for run, extra in (("epochs", []), ("stopped", ["--early_stop_kl", "1e-12"])):
        (tmp_path / run / "out").mkdir(parents=True)
        (tmp_path / run / "out" / "full_sft_64.pth").write_bytes((rl_setup / "start.pth").read_bytes())
        run_script("train_ppo.py", *RL_ARGS, "--ppo_update_iters", "3", "--update_old_actor_freq", "1",
                   "--learning_rate", "1e-2", "--critic_learning_rate", "1e-2", "--max_steps", "2", *extra,
                   "--reward_model_path", str(rl_setup / "rm"), tmp=tmp_path / run)
    rows = metrics(tmp_path / "epochs", "ppo_actor_64_metrics.jsonl")
    assert [r["updates"] for r in rows] == [3, 3]
    assert all(abs(r["ratio"] - 1) > 1e-5 and r["kl_to_old"] > 0 for r in rows)
    assert [r["updates"] for r in metrics(tmp_path / "stopped", "ppo_actor_64_metrics.jsonl")] == [1, 1]


def test_grpo_with_one_generation_is_a_usage_error(tmp_path):
    result = run_script("train_grpo.py", *RL_ARGS, "--num_generations", "1", "--max_steps", "1", tmp=tmp_path,
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num_generations 1: GRPO judges each answer against its siblings" in result.stderr


def test_rule_rewards_only_without_a_reward_model(tmp_path, rl_setup):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "full_sft_64.pth").write_bytes((rl_setup / "start.pth").read_bytes())
    result = run_script("train_grpo.py", *RL_ARGS, "--num_generations", "2", "--max_steps", "1", tmp=tmp_path)
    assert "No --reward_model_path: rewards come from the rules alone" in result.stdout
    assert json.loads((tmp_path / "out" / "grpo_64_metrics.jsonl").read_text().splitlines()[0])["reward"] >= 0
