"""Agentic RL: learn to use tools over several turns, rewarded for the final answer (MiniMind's train_agent.py).

    cd trainer && python train_agent.py                  # from out/full_sft_{hidden}.pth on dataset/agent_rl.jsonl
    python trainer/train_agent.py --loss_type grpo --loss_agg token --ppo_epochs 2 --dynamic_sampling 2

For every task the policy runs G = --num_generations trajectories (trainer/rl/agent.py): each turn is generated
to <|im_end|>, its <tool_call> blocks are run with the offline tools of inference/tools.py (this project's
calculator, dictionary, calendar, and MiniMind's six that its agent_rl.jsonl offers: calculate_math, unit_converter,
get_current_weather, get_current_time, get_exchange_rate, translate_text; plus those of --tools package.module; a
failing, slow or long-winded call comes back as an error result) and the results appended as the chat template
renders a tool turn, up to --max_turns turns. A trajectory is one token sequence - the sampled ids exactly as
sampled, plus the observation ids - and only the sampled tokens carry loss and KL. Rewards (trainer/rl/rewards.py
agent_reward): the gt answers the final answer gives (one rule: no credit for listing candidates), valid calls,
closed tags, the turn limit, repetition, and with --reward_model_path the reward model's score of an answer given
without any tool call (MiniMind's term, agent_model_scores). Then, with A_i the reward relative to its group (as in
GRPO),
    rho_t  = pi(a_t) / pi_sample(a_t)       (pi_sample: the log-probs the rollout engine sampled with)
    cispo  loss_t = -sg(min(rho_t, 1 + eps_high)) A_i log pi(a_t) + beta * KL_t       (Chen et al., 2025, MiniMax-M1)
    grpo   loss_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * KL_t   (Shao et al., 2024)
                    and, for A_i < 0, at most -3 A_i + beta * KL_t (the dual clip, Ye et al., 2020)
KL_t is the k3 estimate of KL(pi || pi_ref). The step's loss (--loss_agg), over the kept trajectories' sampled tokens:
    batch     (default)  sum_b (n_b / N) (1 / |T_b|) sum_{t in T_b} loss_t     n_b trajectories of micro-batch b, N all
    token     (DAPO)     (1 / |T|) sum_{t in T} loss_t                         T every token of the step, all processes
    sequence  (GRPO)     (1 / N) sum_i (1 / |o_i|) sum_{t in o_i} loss_t
--ppo_epochs K updates the policy K times on each rollout batch, so rho moves away from 1 and the clip (or CISPO's
weight cap) corrects for the stale samples; --kl_stop skips the rest of a batch's updates once an update's forward
finds the policy that far from the sampler (the k3 estimate of KL(pi_sample || pi) over the sampled tokens).
Kept: not a prompt that alone fills --max_total_len (skipped, counted), not a cut-off trajectory with
--mask_truncated 1, not a group whose rewards are all equal after --dynamic_sampling redraws (DAPO).
--thinking_ratio renders that share of the trajectories with thinking on (minimind-3's template opens <think>; a
template without that switch refuses a non-zero share). --rollout_engine sglang / vllm samples on a server
(trainer/rl/engines.py), which gets the weights every --sync_interval steps; pi_sample is then the server's
log-probs of weights up to that many steps old (the logged staleness), and rho corrects for them. Right after each
sync the sampler is the policy, so the mean rho must be 1: --ratio_check stops the run when it is not.
Writes out/agent_{hidden}[_moe].pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import (add_engine_arguments, add_reward_model_arguments, common_parser, data_file,  # argparse only
                          parse_args)


def arguments(argv=None):
    parser = common_parser("MiniMind agentic RL", save_weight="agent", epochs=1, batch_size=2, learning_rate=3e-7,
                           accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=1024,
                           data_path="../dataset/agent_rl.jsonl", from_weight="full_sft")
    parser.add_argument("--num_generations", type=int, default=4, help="trajectories per task (G)")
    parser.add_argument("--max_turns", type=int, default=3, help="generated turns per trajectory, at most")
    parser.add_argument("--max_gen_len", type=int, default=256, help="tokens per generated turn, at most")
    parser.add_argument("--max_total_len", type=int, default=2500, help="tokens of a whole trajectory, at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the rollouts")
    parser.add_argument("--thinking_ratio", type=float, default=None,
                        help="share of trajectories with thinking open (default: 0.1 where the chat template has a "
                             "thinking switch, as minimind-3's does; 0 for this project's template, which has none)"
                             "%(default).0s")
    parser.add_argument("--loss_type", default="cispo", choices=["cispo", "grpo"])
    parser.add_argument("--loss_agg", default="batch", choices=["batch", "token", "sequence"],
                        help="batch: token mean in each micro-batch, micro-batches weighted by their trajectories; "
                             "token: one token mean over the whole step (DAPO, CISPO); sequence: each trajectory's "
                             "token mean, then their mean (GRPO)")
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the KL penalty to the reference")
    parser.add_argument("--epsilon", type=float, default=0.2, help="grpo: clip range of the ratio")
    parser.add_argument("--epsilon_high", type=float, default=5.0, help="cispo: the weight is at most 1 + this")
    parser.add_argument("--ppo_epochs", type=int, default=1, help="policy updates on each rollout batch")
    parser.add_argument("--kl_stop", type=float, default=0.0,
                        help="end a batch's updates once KL(pi_sample || pi) passes this; 0 = never")
    parser.add_argument("--mask_truncated", type=int, default=0, choices=[0, 1],
                        help="1 = cut-off trajectories (token budget or turn limit) carry no loss (DAPO's overlong "
                             "filtering)")
    parser.add_argument("--dynamic_sampling", type=int, default=0,
                        help="redraw a task's G trajectories when their rewards are all equal (no signal), up to "
                             "this many times; groups still equal then are dropped (DAPO); 0 = off")
    parser.add_argument("--tools", default=None,
                        help="tools of your own: package.module (comma-separated for several), importable (the "
                             "repository root, trainer/, or PYTHONPATH=. for the current directory), defining TOOLS "
                             "(OpenAI-style schemas) and call(name, arguments) -> dict or str; called by name before "
                             "the built-in tools (inference/tools.py describes the interface)")
    add_reward_model_arguments(parser, what="a local Hugging Face reward model folder: its score (clipped to +-3) is "
                                            "added to the reward of a trajectory that answers without any tool call")
    add_engine_arguments(parser)
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table)
    args = parse_args(parser, argv, minimind3=dict(max_gen_len=768))
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: each trajectory is judged against its group")
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be at least 1")
    if args.thinking_ratio is not None and not 0 <= args.thinking_ratio <= 1:
        parser.error("--thinking_ratio must be between 0 and 1")
    if args.dynamic_sampling < 0:
        parser.error("--dynamic_sampling must be 0 (off) or more")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import random
from collections import Counter
from dataclasses import dataclass

import torch

from common.device import print0
from dataset.lm_dataset import AgentRLDataset
from inference.tools import load_tools
from trainer.distributed import unwrap
from trainer.losses import (cispo_objective, clipped_objective, group_advantages, importance_ratio, k3_kl,
                            k3_kl_to_sampler, masked_mean)
from trainer.resume import Checkpoint
from trainer.rl.agent import pad_trajectories, run_trajectories, trajectory_logprobs
from trainer.rl.engines import check_sampler_ratio, make_engine
from trainer.rl.rewards import agent_model_scores, agent_reward, load_reward_model
from trainer.rl.sampling import thinking_share
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at

REWARD_PARTS = ("answer", "valid_calls", "unclosed", "turn_limit", "repetition", "success")


@dataclass
class Sampled:
    """One micro-batch of trajectories, ready for the update."""
    padded: dict              # pad_trajectories: input_ids, attention_mask [N, L]; loss_mask, sample_logps [N, L - 1]
    advantages: torch.Tensor  # [N] each trajectory's reward relative to its group (as in GRPO)
    keep: torch.Tensor        # [N] 1 for a trajectory that carries loss, 0 for one skipped, dropped or masked
    kept_trajectories: int
    kept_tokens: int          # the sampled tokens of the kept trajectories


def unanswered_tools(rows, toolset):
    """{tool name: tasks offering it} for the tools the data offers that no tool of this run answers (built-in or
    --tools): every call to one of them would be an error result and an invalid call, a run that teaches nothing."""
    return Counter(name for row in rows for name in {t["function"]["name"] for t in row["tools"]}
                   if name not in toolset.names)


def draw(engine, tokenizer, tasks, batch, args, thinking_ratio, toolset=None, reward_model=None):
    """G trajectories for each of the batch's tasks (indices into it), and each one's reward parts (agent_reward,
    with the reward model's scores when there is one)."""
    G = args.num_generations
    trajectories = run_trajectories(engine, tokenizer, [batch["messages"][i] for i in tasks],
                                    [batch["tools"][i] for i in tasks], G, args.max_turns, args.max_gen_len,
                                    thinking_ratio, args.max_total_len, rng=random,  # Run seeds and resumes it
                                    toolset=toolset)
    of_task = [i for i in tasks for _ in range(G)]  # the task of each trajectory
    model_scores = agent_model_scores(trajectories, [batch["messages"][i] for i in of_task], reward_model) \
        or [None] * len(trajectories)
    scores = [agent_reward(t, batch["gt"][i], batch["tools"][i], model_score)
              for t, i, model_score in zip(trajectories, of_task, model_scores)]
    return trajectories, scores


def sample_batch(engine, tokenizer, batch, args, thinking_ratio, counts, device, toolset=None, reward_model=None):
    """The trajectories of one micro-batch of tasks (AgentRLDataset rows through pad_batch), with DAPO's dynamic
    sampling: a task whose G rewards are all equal teaches nothing, so its group is drawn again (up to
    --dynamic_sampling times) and dropped if still equal. Returns (Sampled, each trajectory's reward parts); counts
    what was redrawn, dropped, skipped and masked."""
    G = args.num_generations
    tasks = range(len(batch["gt"]))
    trajectories, scores = draw(engine, tokenizer, tasks, batch, args, thinking_ratio, toolset, reward_model)
    dropped = set()
    for attempt in range(args.dynamic_sampling + 1):
        flat = [i for i in tasks if len({s["total"] for s in scores[i * G:(i + 1) * G]}) == 1]
        if attempt == args.dynamic_sampling or not flat:
            dropped = set(flat) if args.dynamic_sampling else set()
            break
        again, rescored = draw(engine, tokenizer, flat, batch, args, thinking_ratio, toolset, reward_model)
        for k, i in enumerate(flat):
            trajectories[i * G:(i + 1) * G] = again[k * G:(k + 1) * G]
            scores[i * G:(i + 1) * G] = rescored[k * G:(k + 1) * G]
        counts["redrawn_groups"] += len(flat)
    truncated = [bool(args.mask_truncated and (t.cut_off or t.hit_turn_limit)) for t in trajectories]
    keep = [not (t.prompt_too_long or cut or k // G in dropped)
            for k, (t, cut) in enumerate(zip(trajectories, truncated))]
    counts["dropped_groups"] += len(dropped)
    counts["skipped_prompts"] += sum(t.prompt_too_long for t in trajectories)
    counts["masked_truncated"] += sum(cut and not t.prompt_too_long for t, cut in zip(trajectories, truncated))
    padded = {k: v.to(device, non_blocking=True)
              for k, v in pad_trajectories(trajectories, tokenizer.pad_token_id).items()}
    sampled = Sampled(padded, group_advantages(torch.tensor([s["total"] for s in scores]), G).to(device),
                      torch.tensor(keep, dtype=torch.float32, device=device), kept_trajectories=sum(keep),
                      kept_tokens=sum(sum(t.loss_mask) for t, k in zip(trajectories, keep) if k))
    return sampled, scores


def main(args):
    toolset = load_tools(args.tools)  # first: a module that does not load ends the run before anything is loaded
    run = Run(args)
    tokenizer = run.load_tokenizer()
    thinking_ratio = thinking_share(args.thinking_ratio, tokenizer, default=0.1)  # 0 without a thinking switch
    data = AgentRLDataset(data_file(args), on_bad_line="skip" if args.skip_bad_lines else "error")
    unanswered = unanswered_tools(data.rows, toolset)
    if unanswered:
        print0(f"No tool answers {', '.join(f'{n} ({k} tasks)' for n, k in unanswered.most_common(10))}: every call "
               "to them will be an error result and an invalid call. Provide them with --tools package.module "
               "(inference/tools.py describes the interface).")
    model = run.load_model()
    reference = run.frozen_copy(model)
    reward_model = load_reward_model(args, run, rules="the gt answers, valid calls, closed tags, the turn limit")
    reward_parts = REWARD_PARTS + (("model",) if reward_model is not None else ())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the tasks
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir)  # in-process, or an SGLang / vLLM server

    for step, window in run.steps(stream, checkpoint):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        counts = dict(redrawn_groups=0, dropped_groups=0, skipped_prompts=0, masked_truncated=0)
        with run.autocast():  # rollouts first: G trajectories for each task, turn by turn, then scored
            drawn = [sample_batch(engine, tokenizer, batch, args, thinking_ratio, counts, run.device, toolset,
                                  reward_model) for batch in window]
        samples, parts = [s for s, _ in drawn], [p for _, scores in drawn for p in scores]
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # What micro-batch b weighs in the step (--loss_agg): its n_b of the step's N kept trajectories (batch,
        # sequence) or sampled tokens (token), all processes; loss = sum_b (n_b / N) * loss_b + sum_b aux_b / (M * W)
        weights = [s.kept_tokens if args.loss_agg == "token" else s.kept_trajectories for s in samples]
        total = max(run.host_sum(sum(weights))[0], 1)  # all processes, summed on the CPU: no GPU wait
        kept = int(run.host_sum(sum(s.kept_trajectories for s in samples))[0])  # on every process
        updates, loss = 0, None
        for epoch in range(args.ppo_epochs):  # several updates on one rollout batch: rho != 1 from the second on
            sums = StepSums(run)
            for i, (sampled, n) in enumerate(zip(samples, weights)):
                padded = sampled.padded
                with run.grad_sync(model, last=i == len(window) - 1):
                    with run.autocast():
                        with torch.no_grad():
                            ref_logps, _ = trajectory_logprobs(reference, padded, args.temperature)
                        logps, aux_loss = trajectory_logprobs(model, padded, args.temperature)
                        sampler_logps = padded["sample_logps"]  # rho = pi / pi_sample: 1 at the first update
                        if args.loss_type == "cispo":
                            policy_loss = cispo_objective(logps, sampler_logps, sampled.advantages, args.epsilon_high)
                        else:
                            policy_loss = clipped_objective(logps, sampler_logps, sampled.advantages, args.epsilon)
                        # the sampled tokens of the kept trajectories only: observations carry neither loss nor KL
                        mask = padded["loss_mask"] * sampled.keep[:, None]
                        per_token = policy_loss + args.beta * k3_kl(logps, ref_logps)
                        if args.loss_agg == "sequence":  # (1/N) sum_i (1/|o_i|) sum_t loss_it over kept trajectories
                            agent = (masked_mean(per_token, mask, dim=1) * sampled.keep).sum() / \
                                sampled.keep.sum().clamp(min=1)
                        else:  # batch and token: the token mean of the micro-batch, weighted as above
                            agent = masked_mean(per_token, mask)
                    share, aux_share = n / total, aux_loss / len(window) / run.world_size
                    loss_part = agent * share + aux_share
                    run.scaler.scale(loss_part * run.world_size).backward()  # DDP averages over the W processes
                sums.add(share, loss=agent, kl=masked_mean(k3_kl(logps.detach(), ref_logps), mask),
                         ratio=masked_mean(importance_ratio(logps.detach(), sampler_logps), mask),
                         kl_to_sampler=masked_mean(k3_kl_to_sampler(logps.detach(), sampler_logps), mask))
                sums.add(tokens=padded["attention_mask"].sum())  # real tokens, for tokens/s
                if args.use_moe:
                    sums.add(aux_loss=aux_share)
            metrics = sums.over_processes()
            if not kept:  # every trajectory skipped or dropped: nothing to learn from (AdamW would still decay)
                optimizer.zero_grad(set_to_none=True)
                break
            if epoch == 0:  # right after a sync (in-process: always) the sampler is the policy: rho must be 1
                check_sampler_ratio(engine, step - 1, metrics, args.ratio_check)
            if epoch and args.kl_stop and float(metrics["kl_to_sampler"]) > args.kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy has left the samples behind: no further update
                break
            run.scaler.unscale_(optimizer)  # float16's loss scale out of the gradients before clipping
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss, updates = metrics["loss"], updates + 1  # the loss of the update applied, not of one skipped

        rewards = {name: sum(p[name] for p in parts) / len(parts) for name in reward_parts}
        in_use = dict(redrawn_groups=args.dynamic_sampling, dropped_groups=args.dynamic_sampling,
                      masked_truncated=args.mask_truncated, skipped_prompts=True)  # what the log shows
        counts = {name: n for name, n in counts.items() if in_use[name]}
        counts = dict(zip(counts, run.host_sum(*counts.values())))  # over every process, on the CPU
        if not updates:
            metrics.pop("loss")  # no update applied: no loss to log
        run.log(stream, metrics, **({"loss": loss, "lr": lr} if updates else {}),
                reward=sum(p["total"] for p in parts) / len(parts), updates=updates,
                staleness=engine.staleness(step - 1), **rewards, **counts)
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):                     # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()


if __name__ == "__main__":
    main(args)
