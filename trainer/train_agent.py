"""Agentic RL: learn to use tools over several turns, rewarded for the final answer (MiniMind's train_agent.py).

    cd trainer && python train_agent.py                  # from out/full_sft_{hidden}.pth on dataset/agent_rl.jsonl
    python trainer/train_agent.py --loss_type grpo --thinking_ratio 0.5 --ppo_epochs 2

For every task the policy runs G = --num_generations trajectories (trainer/agent_rollout.py): each turn is generated
to <|im_end|>, its <tool_call> blocks are run with the project's offline tools (calculator, dictionary, calendar)
and the results appended as the chat template renders a tool turn, up to --max_turns turns. A trajectory is one
token sequence - the sampled ids exactly as sampled, plus the observation ids - and only the sampled tokens carry
loss and KL. Rewards (trainer/rewards.py agent_reward): the gt answers in the final reply, valid calls, closed
tags, the turn limit, repetition. Then, with A_i the reward relative to its group (as in GRPO),
    rho_t  = pi(a_t) / pi_sample(a_t)       (pi_sample: the log-probs the rollout engine sampled with)
    cispo  loss_t = -sg(min(rho_t, 1 + eps_high)) A_i log pi(a_t) + beta * KL_t       (Chen et al., 2025, MiniMax-M1)
    grpo   loss_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * KL_t   (Shao et al., 2024)
KL_t is the k3 estimate of KL(pi || pi_ref). --ppo_epochs K updates the policy K times on each rollout batch, so
rho moves away from 1 and the clip (or CISPO's weight cap) corrects for the stale samples; --kl_stop skips the rest
of a batch's updates once an update's forward finds the policy that far from the sampler (the k3 estimate of
KL(pi_sample || pi) over the sampled tokens).
--thinking_ratio opens the thinking block in that share of the trajectories. --rollout_engine sglang / vllm samples on
a server (trainer/rollout_engine.py), which gets the weights every --sync_interval steps; pi_sample is then the
server's log-probs of weights up to that many steps old (the logged staleness), and rho corrects for them.
Writes out/agent_{hidden}[_moe].pth.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_engine_arguments, common_parser, data_file, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind agentic RL", save_weight="agent", epochs=1, batch_size=2, learning_rate=3e-7,
                           accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=1024,
                           data_path="../dataset/agent_rl.jsonl", from_weight="full_sft")
    parser.add_argument("--num_generations", type=int, default=4, help="trajectories per task (G)")
    parser.add_argument("--max_turns", type=int, default=3, help="generated turns per trajectory, at most")
    parser.add_argument("--max_gen_len", type=int, default=256, help="tokens per generated turn, at most")
    parser.add_argument("--max_total_len", type=int, default=2500, help="tokens of a whole trajectory, at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the rollouts")
    parser.add_argument("--thinking_ratio", type=float, default=0.1, help="share of trajectories with thinking open")
    parser.add_argument("--loss_type", default="cispo", choices=["cispo", "grpo"])
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the KL penalty to the reference")
    parser.add_argument("--epsilon", type=float, default=0.2, help="grpo: clip range of the ratio")
    parser.add_argument("--epsilon_high", type=float, default=5.0, help="cispo: the weight is at most 1 + this")
    parser.add_argument("--ppo_epochs", type=int, default=1, help="policy updates on each rollout batch")
    parser.add_argument("--kl_stop", type=float, default=0.0,
                        help="end a batch's updates once KL(pi_sample || pi) passes this; 0 = never")
    add_engine_arguments(parser)
    args = parse_args(parser, argv)
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: each trajectory is judged against its group")
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be at least 1")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import random

import torch

from dataset.lm_dataset import AgentRLDataset
from trainer.agent_rollout import pack, rollout, trajectory_logprobs
from trainer.distributed import unwrap
from trainer.losses import cispo_objective, clipped_objective, group_advantages, k3_kl
from trainer.rewards import agent_reward
from trainer.rollout_engine import make_engine
from trainer.rollout import masked_mean
from trainer.trainer_utils import Run

REWARD_PARTS = ("answer", "valid_calls", "unclosed", "turn_limit", "repetition", "success")


def score(trajectories, batch, group_size):
    """Each trajectory's reward parts (agent_reward), its task's gt and tools repeated over the group."""
    tasks = [i for i in range(len(batch["gt"])) for _ in range(group_size)]
    return [agent_reward(t, batch["gt"][i], batch["tools"][i]) for t, i in zip(trajectories, tasks)]


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    data = AgentRLDataset(data_file(args), on_bad_line="skip" if args.skip_bad_lines else "error")
    model = run.load_model()
    reference = run.frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model = run.prepare(model, optimizer)
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir)  # in-process, or an SGLang / vLLM server
    G = args.num_generations

    def loss_fn(batch):
        packed, advantages = batch["packed"], batch["advantages"]
        with torch.no_grad():
            ref_logps, _ = trajectory_logprobs(reference, packed, args.temperature)
        logps, aux_loss = trajectory_logprobs(model, packed, args.temperature)
        sampled = packed["sample_logps"]  # rho = pi / pi_sample: 1 at the first update, then it moves
        if args.loss_type == "cispo":
            policy_loss = cispo_objective(logps, sampled, advantages, args.epsilon_high)
        else:
            policy_loss = clipped_objective(logps, sampled, advantages, args.epsilon)
        mask = packed["loss_mask"]  # the sampled tokens only: observations carry neither loss nor KL
        per_token = policy_loss + args.beta * k3_kl(logps, ref_logps)
        # k3 estimate of KL(pi_sample || pi) on the sampled tokens: rho - 1 - log rho, never negative
        metrics = dict(kl=masked_mean(k3_kl(logps.detach(), ref_logps), mask),
                       ratio=masked_mean(torch.exp(logps.detach() - sampled), mask),
                       kl_to_sampler=masked_mean(k3_kl(sampled, logps.detach()), mask))
        return masked_mean(per_token, mask), aux_loss, metrics

    for step, window in run.steps(data):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        parts = []
        with run.autocast():  # rollouts first: G trajectories for each task, turn by turn, then scored
            for batch in window:
                trajectories = rollout(engine, tokenizer, batch["messages"], batch["tools"], G, args.max_turns,
                                       args.max_gen_len, args.thinking_ratio, args.max_total_len,
                                       rng=random)  # Run seeds and resumes the global RNG
                scores = score(trajectories, batch, G)
                parts += scores
                packed = run.to_device(pack(trajectories, tokenizer.pad_token_id))
                batch.update(packed=packed, trajectory_attention_mask=packed["attention_mask"],
                             advantages=group_advantages(torch.tensor([s["total"] for s in scores]), G).to(run.device))
        updates = 0
        for epoch in range(args.ppo_epochs):  # several updates on one rollout batch: rho != 1 from the second on
            loss = run.accumulate(model, window, loss_fn, count=lambda batch: len(batch["gt"]))  # tasks weigh alike
            if epoch and args.kl_stop and float(run.step_metrics["kl_to_sampler"]) > args.kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy has left the samples behind: no further update
                break
            lr = run.optimizer_step(optimizer)
            updates += 1
        rewards = {name: sum(p[name] for p in parts) / len(parts) for name in REWARD_PARTS}
        run.log(loss=loss, lr=lr, reward=sum(p["total"] for p in parts) / len(parts), updates=updates,
                staleness=engine.staleness(step - 1), **rewards)
        run.maybe_save(model, optimizer)
        if run.should_stop():                          # --max_steps, or Ctrl-C / SIGTERM
            break
    run.finish()


if __name__ == "__main__":
    main(args)
