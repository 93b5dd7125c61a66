"""The whole pipeline on the bundled demo data, on a CPU: pretrain -> full SFT -> agentic RL -> LoRA identity -> DPO
-> reasoning distillation -> knowledge distillation -> GRPO, each evaluated on held-out data.

    python scripts/run_demo.py            # 20 minutes on a 2-core AMD EPYC VM (fp32, kernels at AVX2), up to 40 on
                                          # slower 2-core VMs (docs/benchmarks.md); writes out/demo_report.md
    python scripts/run_demo.py --quick    # a 1-minute smoke run with a tiny model (numbers mean nothing)

Each stage runs the real trainer command line (printed as it goes). Every number in the report is
measured on held-out data that no stage trained on:
  pretrain   loss on dataset/demo/pretrain_eval.jsonl, before (random init) and after
  full SFT   loss on the answers of sft_eval.jsonl, and the exact-match rate on its verifiable questions,
             greedy decoding, before and after: skills a small model learns in minutes (how many words a list
             has, whether a sentence is Chinese or English, the weekday / month / number word before or after
             another) and recall it mostly cannot (a poem's author or next line, an idiom's reading, arithmetic)
  tools      on 150 held-out tool requests (tools_eval.jsonl, cedict/tools_eval.jsonl; scripts/eval_toolcall.py),
             before and after SFT: a valid <tool_call> of the right tool (calculator, dictionary, calendar),
             with the right arguments, and a valid call at all
  agent      on the held-out tool tasks of agent_rl_eval.jsonl, before (the SFT model) and after agentic RL
             (train_agent.py, from the SFT model): the agent reward (what the stage maximises) and the task
             success (every gt answer given by the final answer) of 2 multi-turn tool-using trajectories per task
             sampled as in training, with the share of valid tool calls beside
  LoRA       held-out "who are you?" phrasings answered with "MiniMind", before and after the adapter
  DPO        on dpo_eval.jsonl, whose rejected answers dodge the question, answer in the other language, loop
             or miscount: how often the model gives the chosen answer a higher (per-token mean) log-probability
             than the rejected one, and the mean margin, for the SFT model and after DPO
  reasoning  share of held-out r1_eval.jsonl prompts answered in the exact <think>..</think><answer>..</answer>
             layout, before (the DPO model) and after reasoning distillation
  KD         held-out SFT answer loss of a small student (96x2) distilled from the SFT model for a third of an epoch,
             against a control student trained the same way without the teacher (alpha = 1)
  GRPO       on the verifiable prompts of rlaif_eval.jsonl, before (the reasoning model) and after GRPO: the mean
             rule reward of 8 answers sampled per prompt at the training temperature (what GRPO maximises), and
             the rule reward and exact-answer rate of the greedy answers
Each change comes with a 95% paired-bootstrap interval over the held-out items. Weights go to out/demo/, the
report to out/demo_report.md and out/demo_report.json, loss curves to out/demo_loss_curves.png.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root
from common.cli import HelpFormatter, show_defaults


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--pretrain_epochs", type=int, default=2)
    parser.add_argument("--sft_epochs", type=int, default=2)
    parser.add_argument("--lora_epochs", type=int, default=40)
    parser.add_argument("--student_hidden_size", type=int, default=96)
    parser.add_argument("--student_num_layers", type=int, default=2)
    parser.add_argument("--grpo_steps", type=int, default=64)
    parser.add_argument("--agent_steps", type=int, default=16)
    parser.add_argument("--kd_steps", type=int, default=200, help="optimizer steps of each KD run (about a third of an epoch)")
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "out"))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps per stage: a smoke test")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="training precision of every stage; default float32 on a CPU (bf16 autocast is often "
                        "slower there, and the README's numbers are fp32) and bfloat16 on a GPU")
    return show_defaults(parser).parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.device import choose_dtype, pick_device
from dataset.lm_dataset import AgentRLDataset, DPODataset, PretrainDataset, SFTDataset, stack_pairs
from common.chat import render
from inference.chat_core import greedy_replies
from model.model_lora import apply_lora, load_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import load_state_dict_strict
from scripts.eval_toolcall import DEMO_REQUESTS, read_requests, tool_call_scores
from scripts.plot_metrics import plot
from trainer.losses import sequence_logps
from trainer.sampler import collate
from trainer.rl.agent import run_trajectories
from trainer.rl.rewards import agent_reward, answer_reward, normalise, rule_rewards
from trainer.rl.sampling import sample
from trainer.rl.engines import TorchEngine


DEMO = os.path.join(REPO_ROOT, "dataset", "demo")


def train(script, settings, **options):
    """Run one trainer script from the repository root as a user would; return its wall time and command."""
    command = [sys.executable, os.path.join("trainer", script)] + settings + \
        [item for key, value in options.items() for item in (f"--{key}", str(value))]
    print("\n$ " + " ".join(["python"] + command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start, " ".join(["python"] + command[1:])


def load(config, path, lora_path=None):
    model = MiniMindForCausalLM(config)
    if path:
        load_state_dict_strict(model, torch.load(path, map_location="cpu", weights_only=True), source=path)
    if lora_path:
        state = torch.load(lora_path, map_location="cpu", weights_only=True)
        apply_lora(model, rank=next(v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight")))
        load_lora(model, state)
    return model.eval()


@torch.no_grad()
def held_out_losses(model, dataset, batch_size=16, limit=None):
    """Per row of the dataset (the first `limit` rows): (mean next-token loss over its label tokens, how many).
    The head runs at the label positions only (the collator's loss_index), as in training; the mean loss of a row is
    minus the mean log-prob of its label tokens."""
    rows, size = [], min(len(dataset), limit or len(dataset))
    for start in range(0, size, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, size))])
        logits = model(batch["input_ids"], loss_index=batch["loss_index"]).logits  # right-padded: causal suffices
        losses = -sequence_logps(logits, batch["labels"], batch["loss_index"], "mean")
        counts = (batch["labels"][:, 1:] != -100).sum(1)
        rows += [(float(l), int(n)) for l, n in zip(losses, counts) if n > 0]
    return rows


def weighted_mean(values, weights=None):
    weights = weights or [1] * len(values)
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def paired_interval(before, after, weights=None, samples=4000, seed=0):
    """95% interval of the change (after - before) of a held-out mean, by the paired bootstrap: the items are
    resampled with replacement, each keeping its own before and after value (Efron & Tibshirani, 1993)."""
    before, after = torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64)
    weights = torch.ones_like(before) if weights is None else torch.tensor(weights, dtype=torch.float64)
    picks = torch.randint(len(before), (samples, len(before)), generator=torch.Generator().manual_seed(seed))
    w = weights[picks]
    changes = ((after[picks] - before[picks]) * w).sum(1) / w.sum(1)
    low, high = torch.quantile(changes, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [low, high]


def stage_result(stage, metric, before, after, higher_is_better, seconds=None, weights=None, primary=True,
                 percent=False):
    """One row of the report card: the held-out means before and after the stage and the 95% interval of
    the change, measured on the same items; `improved` when the whole interval lies on the good side of 0.
    percent: the values are shares (of answers right, of calls valid ...), shown as percentages."""
    low, high = paired_interval(before, after, weights)
    return dict(stage=stage, metric=metric, before=weighted_mean(before, weights), after=weighted_mean(after, weights),
                higher_is_better=higher_is_better, ci95=[low, high], items=len(before), primary=primary, percent=percent,
                improved=low > 0 if higher_is_better else high < 0,
                seconds=None if seconds is None else round(seconds, 1))


@torch.no_grad()
def answer(model, tokenizer, questions, max_new_tokens=32, batch_size=32):
    """Greedy answers to single-turn questions."""
    prompts = [render(tokenizer, [{"role": "user", "content": q}], generation_prompt=True) for q in questions]
    return [a.strip() for a in greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)]


@torch.no_grad()
def preference_margins(model, dataset, batch_size=16, limit=None):
    """Per pair (the first `limit`): log pi(chosen) - log pi(rejected), per-token means over the answers."""
    margins, size = [], min(len(dataset), limit or len(dataset))
    for start in range(0, size, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, size))])
        ids, _, labels = stack_pairs(batch, 0)  # as DPO's step: the head at the answers' positions only
        logps = sequence_logps(model(ids, loss_index=batch["loss_index"]).logits, labels, batch["loss_index"], "mean")
        n = len(batch["index"])
        margins += (logps[:n] - logps[n:]).tolist()
    return margins


REASONING_LAYOUT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)


def format_compliance(model, tokenizer, questions):
    """Per question: 1 if the greedy answer has the exact <think>..</think><answer>..</answer> layout; the answers."""
    answers = answer(model, tokenizer, questions, max_new_tokens=96)
    return [float(bool(REASONING_LAYOUT.fullmatch(a.strip()))) for a in answers], answers


def rl_scores(model, tokenizer, rows, temperature, samples=8, seed=0):
    """Per RL prompt with verifiable answers, the quantities GRPO and a user care about:
    the mean rule reward of `samples` answers sampled at the training temperature (GRPO's objective, the
    expected reward of its sampling policy, here on held-out prompts), and the rule reward and exact
    answer (0/1) of the greedy answer."""
    torch.manual_seed(seed)
    prompts = [tokenizer.apply_chat_template([r["conversations"][0]], tokenize=False, add_generation_prompt=True)
               for r in rows]
    sampled = []
    for start in range(0, len(rows), 16):
        rollout = sample(TorchEngine(model, tokenizer, temperature, logprobs=False), tokenizer,
                         prompts[start:start + 16], 128, 64, samples)
        extras = [dict(answers=r["answers"]) for r in rows[start:start + 16] for _ in range(samples)]
        sampled += rule_rewards(rollout.texts, extras, reasoning=True).view(-1, samples).mean(1).tolist()
    texts = answer(model, tokenizer, [r["conversations"][0]["content"] for r in rows], max_new_tokens=96)
    extras = [dict(answers=r["answers"]) for r in rows]
    greedy = rule_rewards(texts, extras, reasoning=True).tolist()
    return sampled, greedy, [answer_reward(t, e["answers"]) for t, e in zip(texts, extras)]


AGENT_TURNS, AGENT_TURN_TOKENS = 2, 48  # a call and the answer after its result


def agent_scores(model, tokenizer, rows, temperature, samples=2, seed=0):
    """Per held-out tool task, over `samples` trajectories sampled as in training (trainer/rl/agent.py): the
    mean agent reward, task success (every gt answer given by the final answer) and valid-call share (agent_reward)."""
    torch.manual_seed(seed)
    rng, engine, scores = random.Random(seed), TorchEngine(model, tokenizer, temperature), []
    for start in range(0, len(rows), 16):
        batch = rows[start:start + 16]
        trajectories = run_trajectories(engine, tokenizer, [r["messages"] for r in batch], [r["tools"] for r in batch],
                               samples, AGENT_TURNS, AGENT_TURN_TOKENS, rng=rng)
        for i, row in enumerate(batch):
            parts = [agent_reward(t, row["gt"], row["tools"]) for t in trajectories[i * samples:(i + 1) * samples]]
            scores.append({k: sum(p[k] for p in parts) / samples for k in ("total", "success", "valid_calls")})
    return scores


def agent_reading(reward, success, valid_calls):
    """What the agent stage shows, from its three result rows: which moved (95% interval clear of 0) and, when only the
    reward rose, where the gain must come from."""
    def moved(r):
        return "rose" if r["ci95"][0] > 0 else "fell" if r["ci95"][1] < 0 else "did not move significantly"
    line = (f"Agent stage: the reward {moved(reward)}, task success {moved(success)}, the share of valid tool calls "
            f"{moved(valid_calls)}")
    if reward["ci95"][0] > 0 and success["ci95"][0] <= 0 and valid_calls["ci95"][0] <= 0:
        return line + ": the gain is in the reward's other terms (repeated words, closed tags, the turn limit), not in " \
            "tool use."
    return line + "."


def exact_match(model, tokenizer, rows):
    """Per verifiable question: 1 if the greedy answer is exactly the expected one; hits by kind; samples."""
    questions = [next(m["content"] for m in r["conversations"] if m["role"] == "user") for r in rows]
    got = answer(model, tokenizer, questions)
    hits, per_kind = [], {}
    for question, row, out in zip(questions, rows, got):
        hits.append(float(normalise(out) == normalise(row["answer"])))
        per_kind.setdefault(row["kind"].replace("_", " "), []).append(hits[-1])
    return hits, {k: (int(sum(v)), len(v)) for k, v in sorted(per_kind.items())}, list(zip(questions, rows, got))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(args):
    device = torch.device(pick_device())
    # Decided once here (with its notice, if bf16 is not native), then passed to every stage.
    requested = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = str(choose_dtype(requested, device if device.type != "cuda" else torch.device("cuda", 0))).removeprefix("torch.")
    if args.quick:
        args.hidden_size, args.num_hidden_layers, args.student_hidden_size, args.student_num_layers = 64, 2, 32, 1
    start_all = time.perf_counter()
    save_dir = os.path.join(args.out_dir, "demo")
    shown = lambda p: os.path.relpath(p, REPO_ROOT) if p.startswith(REPO_ROOT) else p  # noqa: E731
    for old in ("pretrain", "full_sft", "agent", "lora_identity", "dpo", "reason", "full_dist", "full_dist_control",
                "grpo"):
        size = args.student_hidden_size if old.startswith("full_dist") else args.hidden_size  # an earlier demo's
        path = os.path.join(save_dir, f"{old}_{size}_metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    settings = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
                "--save_dir", shown(save_dir), "--checkpoint_dir", shown(os.path.join(save_dir, "checkpoints")),
                "--num_workers", "0", "--dtype", dtype,
                "--log_interval", "10", "--save_interval", "1000"]
    quick = ["--max_steps", "3"] if args.quick else []
    config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    path = lambda name: os.path.join(save_dir, f"{name}_{args.hidden_size}.pth")  # noqa: E731
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
    torch.manual_seed(0)

    results = []
    sampled = slice(0, 24) if args.quick else slice(None)  # --quick: a few held-out items only
    limit = 48 if args.quick else None
    eval_losses = lambda model, data: held_out_losses(model, data, limit=limit)  # noqa: E731
    # Stage 1: pretraining
    pretrain_eval = PretrainDataset(os.path.join(DEMO, "pretrain_eval.jsonl"), tokenizer, max_length=256)
    before = eval_losses(load(config, None), pretrain_eval)
    seconds, cmd_pretrain = train("train_pretrain.py", settings + quick, data_path=shown(os.path.join(DEMO, "pretrain.jsonl")),
                                  epochs=args.pretrain_epochs, batch_size=16, max_seq_len=256, packing=1,
                                  group_by_length=0,  # packed rows are all full: nothing to group
                                  accumulation_steps=1, learning_rate=2e-3, warmup_steps=20)
    pretrained = load(config, path("pretrain"))
    after = eval_losses(pretrained, pretrain_eval)
    results.append(stage_result("pretrain", f"loss on pretrain_eval.jsonl ({len(after)} documents, per token)",
                                [b for b, _ in before], [a for a, _ in after], False, seconds, [n for _, n in after]))

    # Stage 2: full SFT
    verifiable = [r for r in read_jsonl(os.path.join(DEMO, "sft_eval.jsonl")) if "answer" in r][sampled]
    sft_eval = SFTDataset(os.path.join(DEMO, "sft_eval.jsonl"), tokenizer, max_length=256)
    sft_loss_before = eval_losses(pretrained, sft_eval)
    em_before, kinds_before, _ = exact_match(pretrained, tokenizer, verifiable)
    tool_requests = read_requests(DEMO_REQUESTS)[sampled]
    tools_before = tool_call_scores(pretrained, tokenizer, tool_requests)
    # the SFT data: conversations, and tool conversations (a request, the call, the result, the answer), listed
    # three times: seen only twice (2 epochs) they taught the call's layout to no held-out request. About 650
    # tokens each (the tool schemas fill the system prompt), they take SFT from 4.0 to 7.5 minutes
    tool_files = [os.path.join(DEMO, "tools.jsonl"), os.path.join(DEMO, "cedict", "tools.jsonl")]
    sft_files = [os.path.join(DEMO, "sft.jsonl")] + tool_files * 3
    seconds, cmd_sft = train("train_full_sft.py", settings + quick, data_path=",".join(shown(f) for f in sft_files),
                             epochs=args.sft_epochs, batch_size=16, max_seq_len=832, learning_rate=1e-3,
                             group_by_length=1, from_weight="pretrain")
    sft_model = load(config, path("full_sft"))
    sft_loss_after = eval_losses(sft_model, sft_eval)
    em_after, kinds_after, samples = exact_match(sft_model, tokenizer, verifiable)
    results.append(stage_result("sft", f"exact match on {len(verifiable)} verifiable questions of sft_eval.jsonl",
                                em_before, em_after, True, seconds, percent=True))
    results.append(stage_result("sft", f"loss on the answers of sft_eval.jsonl ({len(sft_loss_after)} conversations)",
                                [b for b, _ in sft_loss_before], [a for a, _ in sft_loss_after], False,
                                weights=[n for _, n in sft_loss_after], primary=False))
    tools_after = tool_call_scores(sft_model, tokenizer, tool_requests)
    for key, what, primary in (("right_tool", "a valid call of the right tool", True),
                               ("right_arguments", "... with the right arguments", False),
                               ("valid", "a valid <tool_call> JSON call", False)):
        results.append(stage_result("tools", f"{what}, {len(tool_requests)} held-out tool requests (after SFT)",
                                    [float(s[key]) for s in tools_before], [float(s[key]) for s in tools_after],
                                    True, primary=primary, percent=True))

    # Stage 2b: agentic RL on tool tasks (multi-turn, tools run between the turns), from the SFT model
    agent_eval = AgentRLDataset(os.path.join(DEMO, "agent_rl_eval.jsonl")).rows[sampled]
    agent_temperature = 0.8
    agent_before = agent_scores(sft_model, tokenizer, agent_eval, agent_temperature)
    seconds, cmd_agent = train("train_agent.py", settings + (quick or ["--max_steps", str(args.agent_steps)]),
                               data_path=shown(os.path.join(DEMO, "agent_rl.jsonl")), from_weight="full_sft",
                               num_generations=4, batch_size=2, max_turns=AGENT_TURNS, max_gen_len=AGENT_TURN_TOKENS,
                               temperature=agent_temperature, thinking_ratio=0.0, learning_rate=5e-5, beta=0.02)
    agent_after = agent_scores(load(config, path("agent")), tokenizer, agent_eval, agent_temperature)
    for key, what, primary, at in (  # the reward is what the stage maximises (as for GRPO); success is the goal
            ("total", "agent reward (-3 to 3: the answer, valid tool use, closed tags, turn limit, repetition)", True,
             seconds),
            ("success", "task success (every gt answer given by the final answer)", False, None),
            ("valid_calls", "share of tool calls that are valid (an offered tool, arguments it accepts)", False, None)):
        results.append(stage_result("agent", f"{what}, 2 trajectories sampled as in training (temperature "
                                    f"{agent_temperature}) per {len(agent_eval)} held-out agent_rl_eval.jsonl tasks",
                                    [s[key] for s in agent_before], [s[key] for s in agent_after], True, at,
                                    primary=primary, percent=key != "total"))

    # Stage 3: LoRA identity
    identity = read_jsonl(os.path.join(DEMO, "lora_identity_eval.jsonl"))
    identity_questions = [r["conversations"][0]["content"] for r in identity]
    before_identity = answer(sft_model, tokenizer, identity_questions, max_new_tokens=48)
    seconds, cmd_lora = train("train_lora.py", settings + quick, data_path=shown(os.path.join(DEMO, "lora_identity.jsonl")),
                              epochs=args.lora_epochs, batch_size=16, max_seq_len=256, learning_rate=2e-3, group_by_length=1,
                              from_weight="full_sft")
    lora_model = load(config, path("full_sft"), os.path.join(save_dir, "lora", f"lora_identity_{args.hidden_size}.pth"))
    after_identity = answer(lora_model, tokenizer, identity_questions, max_new_tokens=48)
    results.append(stage_result("lora", f"{len(identity)} held-out \"who are you?\" phrasings answered with \"MiniMind\"",
                                [float("MiniMind" in a) for a in before_identity],
                                [float("MiniMind" in a) for a in after_identity], True, seconds, percent=True))

    # Stage 4: DPO, from the SFT model. lr 2e-5: at 1e-4 the held-out accuracy rises as much, but the log-probs
    # of chosen and rejected answers both fall and greedy answers turn to garbage (a known DPO failure).
    dpo_eval = DPODataset(os.path.join(DEMO, "dpo_eval.jsonl"), tokenizer, max_length=256)
    margins_before = preference_margins(sft_model, dpo_eval, limit=limit)
    seconds, cmd_dpo = train("train_dpo.py", settings + quick, data_path=shown(os.path.join(DEMO, "dpo.jsonl")),
                             epochs=1, batch_size=8, max_seq_len=256, group_by_length=1, learning_rate=2e-5, beta=0.1,
                             precompute_ref=0 if args.quick else 1, from_weight="full_sft")  # quick: 3 steps
    dpo_model = load(config, path("dpo"))
    margins_after = preference_margins(dpo_model, dpo_eval, limit=limit)
    results.append(stage_result("dpo", f"preference accuracy on dpo_eval.jsonl ({len(margins_after)} pairs): "
                                "log-prob of chosen > rejected", [float(m > 0) for m in margins_before],
                                [float(m > 0) for m in margins_after], True, seconds, percent=True))
    results.append(stage_result("dpo", "log-prob margin, chosen - rejected (per-token mean)", margins_before,
                                margins_after, True, primary=False))

    # Stage 5: reasoning distillation, from the DPO model
    r1_questions = [r["conversations"][0]["content"] for r in read_jsonl(os.path.join(DEMO, "r1_eval.jsonl"))][sampled]
    layout_before, _ = format_compliance(dpo_model, tokenizer, r1_questions)
    seconds, cmd_reason = train("train_distill_reason.py", settings + quick, data_path=shown(os.path.join(DEMO, "r1.jsonl")),
                                epochs=1, batch_size=16, max_seq_len=256, learning_rate=1e-3, group_by_length=1,
                                from_weight="dpo")
    layout_after, reason_samples = format_compliance(load(config, path("reason")), tokenizer, r1_questions)
    results.append(stage_result("reasoning", f"{len(r1_questions)} r1_eval.jsonl prompts answered in the "
                                "<think>…</think><answer>…</answer> layout", layout_before, layout_after, True, seconds,
                                percent=True))

    # Stage 6: knowledge distillation, a smaller student from the SFT model as teacher, against a control: the
    # same student, data, steps and seed with alpha = 1 (the hard-label loss alone, no teacher)
    student_config = MiniMindConfig(hidden_size=args.student_hidden_size, num_hidden_layers=args.student_num_layers)
    model_size = ("--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers))
    kd_settings = [x for x in settings if x not in model_size] + (quick or ["--max_steps", str(args.kd_steps)])
    kd_options = dict(data_path=shown(os.path.join(DEMO, "sft.jsonl")), student_hidden_size=args.student_hidden_size,
                      student_num_layers=args.student_num_layers, teacher_hidden_size=args.hidden_size,
                      teacher_num_layers=args.num_hidden_layers, from_weight="none", teacher_weight="full_sft",
                      epochs=1, batch_size=16, max_seq_len=256, learning_rate=2e-3, group_by_length=1)
    _, cmd_control = train("train_distillation.py", kd_settings, **kd_options, alpha=1.0,
                           save_weight="full_dist_control")
    seconds, cmd_kd = train("train_distillation.py", kd_settings, **kd_options)
    student = lambda name: load(student_config, os.path.join(save_dir, f"{name}_{args.student_hidden_size}.pth"))  # noqa: E731
    control_losses = eval_losses(student("full_dist_control"), sft_eval)
    kd_losses = eval_losses(student("full_dist"), sft_eval)
    results.append(stage_result("kd", f"student {args.student_hidden_size}×{args.student_num_layers} loss on the answers "
                                f"of sft_eval.jsonl: trained without the teacher (before) vs with it (after)",
                                [c for c, _ in control_losses], [k for k, _ in kd_losses], False, seconds,
                                [n for _, n in kd_losses]))

    # Stage 7: GRPO on the verifiable RL prompts, from the reasoning model
    rl_eval = [r for r in read_jsonl(os.path.join(DEMO, "rlaif_eval.jsonl")) if r["answers"]][sampled]
    grpo_temperature = 1.0
    sampled_before, greedy_before, exact_before = rl_scores(load(config, path("reason")), tokenizer, rl_eval,
                                                            grpo_temperature)
    seconds, cmd_grpo = train("train_grpo.py", settings + (quick or ["--max_steps", str(args.grpo_steps)]),
                              data_path=shown(os.path.join(DEMO, "rlaif.jsonl")), from_weight="reason",
                              reasoning=1, num_generations=8, temperature=grpo_temperature, batch_size=4,
                              max_seq_len=128, max_gen_len=64, learning_rate=5e-5, beta=0.02)
    sampled_after, greedy_after, exact_after = rl_scores(load(config, path("grpo")), tokenizer, rl_eval,
                                                         grpo_temperature)
    results.append(stage_result("grpo", f"mean rule reward (format + answer, 0-2.5) of 8 answers sampled as in training "
                                f"(temperature {grpo_temperature}) to each of {len(rl_eval)} verifiable rlaif_eval.jsonl "
                                "prompts", sampled_before, sampled_after, True, seconds))
    results.append(stage_result("grpo", "mean rule reward of the greedy answers", greedy_before, greedy_after, True,
                                primary=False))
    results.append(stage_result("grpo", "exact-answer rate of the greedy answers", exact_before, exact_after, True,
                                primary=False, percent=True))

    curves = plot([os.path.join(save_dir, f"{n}_{args.hidden_size}_metrics.jsonl")
                   for n in ("pretrain", "full_sft", "agent", "lora_identity", "dpo", "reason")] +
                  [os.path.join(save_dir, f"full_dist_{args.student_hidden_size}_metrics.jsonl"),
                   os.path.join(save_dir, f"grpo_{args.hidden_size}_metrics.jsonl")],
                  os.path.join(args.out_dir, "demo_loss_curves.png"), title="MiniMind demo: training loss, stages in order")
    total_minutes = (time.perf_counter() - start_all) / 60
    summary = dict(model=f"{args.hidden_size}x{args.num_hidden_layers}",
                   parameters=sum(p.numel() for p in sft_model.parameters()), device=device.type, dtype=dtype,
                   cpu_cores=os.cpu_count(), torch=torch.__version__, minutes=round(total_minutes, 1),
                   quick=args.quick, stages=results)
    with open(os.path.join(args.out_dir, "demo_report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)

    def row(r):
        low, high = r["ci95"]
        change = r["after"] - r["before"]
        shown_value = (lambda v: f"{v:.1%}") if r["percent"] else (lambda v: f"{v:.3f}")
        fmt = (lambda v: f"{v * 100:+.1f} pt") if r["percent"] else (lambda v: f"{v:+.3f}")
        verdict = ("better" if r["improved"] else "not significant") if r["primary"] else ""
        time_cell = f"{r['seconds'] / 60:.1f} min" if r["seconds"] is not None else ""
        return (f"| {r['stage']} | {time_cell} | {r['metric']} | {shown_value(r['before'])} | "
                f"{shown_value(r['after'])} | {fmt(change)} [{fmt(low)}, {fmt(high)}] | {verdict} |")

    kinds = "; ".join(f"{k} {kinds_before[k][0]}→{kinds_after[k][0]}/{n}" for k, (_, n) in kinds_after.items())
    lines = [
        "# MiniMind demo report", "",
        f"Model {summary['model']} ({summary['parameters'] / 1e6:.2f}M parameters), bundled demo data, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {device.type}, {dtype}; "
        f"{total_minutes:.1f} minutes in all{' (quick smoke run: the numbers mean nothing)' if args.quick else ''}.", "",
        "Every number is measured on held-out files that no stage trained on. The change comes with its 95% interval "
        "(paired bootstrap over the held-out items); \"better\" means the whole interval is on the good side of 0. "
        "The same numbers are in demo_report.json.", "",
        "| stage | time | metric (held-out) | before | after | change [95% interval] | |", "|---|---|---|---|---|---|---|",
        *[row(r) for r in results], "",
        f"Exact matches by kind (before SFT → after SFT / questions): {kinds}.", "",
        agent_reading(*[r for r in results if r["stage"] == "agent"]), "",
        f"![loss curves]({os.path.relpath(curves, args.out_dir)})", "",
        "## Sample answers after SFT", "", "| question | expected | answer |", "|---|---|---|",
    ]
    lines += [f"| {q} | {r['answer']} | {a.replace(chr(10), ' ')[:80]} |" for q, r, a in samples[:12]]
    lines += ["", "## Tool calls after SFT", "", "| request | expected call | reply |", "|---|---|---|"]
    lines += [f"| {next(m['content'] for m in r['conversations'] if m['role'] == 'user')} | "
              f"{json.dumps(r['call'], ensure_ascii=False)} | {s['reply'].replace(chr(10), ' ')[:100]} |"
              for r, s in list(zip(tool_requests, tools_after))[::max(1, len(tool_requests) // 9)][:9]]
    lines += ["", "## Identity before and after the LoRA adapter", "", "| question | before | after |", "|---|---|---|"]
    lines += [f"| {q} | {b.replace(chr(10), ' ')[:80]} | {a.replace(chr(10), ' ')[:80]} |"
              for q, b, a in zip(identity_questions, before_identity, after_identity)]
    lines += ["", "## Reasoning answers after distillation", "", "| question | answer |", "|---|---|"]
    lines += [f"| {q} | {a.replace(chr(10), ' ')[:100]} |" for q, a in zip(r1_questions[:6], reason_samples[:6])]
    lines += ["", "## Commands", "", "```", cmd_pretrain, cmd_sft, cmd_agent, cmd_lora, cmd_dpo, cmd_reason, cmd_control, cmd_kd,
              cmd_grpo, "```", ""]
    report = os.path.join(args.out_dir, "demo_report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"\n{report} written ({total_minutes:.1f} min)\n")
    print("\n".join(lines[:8 + len(results)]))
    weak = [r["stage"] for r in results if r["primary"] and not r["improved"]]
    if weak and not args.quick:
        print(f"\nNo significant held-out gain from: {', '.join(weak)} (see the intervals above).")


if __name__ == "__main__":
    main(args)
