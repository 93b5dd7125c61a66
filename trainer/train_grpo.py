"""GRPO: reinforcement learning without a critic, each answer judged against its siblings
(Shao et al., 2024, "DeepSeekMath", Group Relative Policy Optimization).

    cd trainer && python train_grpo.py                # from out/reason_512.pth (--reasoning 1) on rlaif-mini.jsonl
    python trainer/train_grpo.py --reasoning 0 --reward_model_path /path/to/reward_model

For every prompt the policy samples G = --num_generations answers; with rewards r_1..r_G
    advantage  A_i = (r_i - mean(r)) / (std(r) + 1e-4)              (the same for every token of answer i)
    ratio      rho_t = pi(a_t) / pi_old(a_t)                        (pi_old = the policy that sampled)
    loss_t     = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * KL_t
    KL_t       = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (the k3 estimator of KL(pi || pi_ref))
averaged over all answer tokens. Rewards: rule rewards (format, verifiable answers) and an optional reward
model (trainer/rewards.py). Writes out/grpo_{hidden}[_moe].pth.

--loss_type cispo (Chen et al., 2025, "MiniMax-M1", Clipped IS-weight Policy Optimization) replaces the PPO clip:
    loss_t     = -sg(min(rho_t, 1 + eps_high)) A_i logp_t + beta * KL_t
the importance weight is clipped and taken as a constant, so every token keeps a gradient (PPO-clip zeroes
the gradient of tokens whose ratio left the clip range). With one update per rollout (--ppo_epochs 1, MiniMind's
setting) rho = 1 and the two losses have the same gradient; --ppo_epochs K updates the policy K times on each
rollout batch, pi_old staying the policy that sampled (its log-probs kept from the first update's forward), so rho
moves away from 1 and the clip / the weight cap take effect. --kl_stop skips the rest of a batch's updates once an
update's forward finds the policy that far from pi_old (the k3 estimate of KL(pi_old || pi) over the answer
tokens). --rollout_engine sglang / vllm samples on a server (trainer/rollout_engine.py) that gets the weights every
--sync_interval steps: pi_old is then the server's log-probs, so rho != 1 from the first update and the clip
corrects for the stale weights (logged: staleness, ratio, kl_to_old).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_rl_arguments, common_parser, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind GRPO", save_weight="grpo", epochs=1, batch_size=2, learning_rate=8e-8,
                           accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                           data_path="../dataset/rlaif-mini.jsonl", from_weight=None)
    add_rl_arguments(parser, max_gen_len=1536)
    parser.add_argument("--num_generations", type=int, default=8, help="answers sampled per prompt (G)")
    parser.add_argument("--beta", type=float, default=0.02, help="weight of the KL penalty to the reference")
    parser.add_argument("--epsilon", type=float, default=0.2, help="clip range of the importance ratio (grpo)")
    parser.add_argument("--loss_type", default="grpo", choices=["grpo", "cispo"],
                        help="grpo: PPO-clip on the ratio; cispo: clipped importance weight times log-prob")
    parser.add_argument("--epsilon_high", type=float, default=0.28, help="cispo: the weight is at most 1 + this")
    parser.add_argument("--ppo_epochs", type=int, default=1, help="policy updates on each rollout batch")
    parser.add_argument("--kl_stop", type=float, default=0.0,
                        help="end a batch's updates once KL(pi_old || pi) passes this; 0 = never")
    args = parse_args(parser, argv)
    if args.num_generations < 2:  # the group's std of one answer is undefined: every advantage would be nan
        parser.error(f"--num_generations {args.num_generations}: GRPO judges each answer against its siblings, so it "
                     "needs at least 2 answers per prompt (for one answer per prompt use train_spo.py)")
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be at least 1")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from trainer.distributed import unwrap
from trainer.losses import (cispo_objective, clipped_objective, group_advantages, importance_ratio,  # the formulas
                            k3_kl, k3_kl_to_sampler)
from trainer.rollout import completion_logprobs, masked_mean, sample_and_score, start_rl_run
from trainer.rollout_engine import check_sampler_ratio, make_engine


def main(args):
    run, tokenizer, data, reward_model = start_rl_run(args)
    model = run.load_model()
    reference = run.frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model = run.prepare(model, optimizer)
    # in-process, pi_old comes from the policy's own forward: the engine keeps no sampling log-probs
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir, logprobs=False)
    G = args.num_generations

    def loss_fn(batch):
        rollout, rewards = batch["rollout"], batch["rewards"]
        advantages = group_advantages(rewards, G)
        with torch.no_grad():
            ref_logps, _ = completion_logprobs(reference, rollout)
        logps, aux_loss = completion_logprobs(model, rollout)
        # pi_old is the policy that sampled. In-process: the policy itself, its log-probs taken from this first
        # forward (rho = 1 exactly, the PPO-clip gradient) and kept for the further updates of --ppo_epochs, where
        # rho moves away from 1. A server engine samples with weights up to --sync_interval steps old: its own
        # log-probs are pi_old, and the clip corrects for the staleness from the first update on.
        if rollout.old_logps is None:
            rollout.old_logps = logps.detach() if args.rollout_engine == "torch" else rollout.sample_logps
        if args.loss_type == "cispo":
            policy_loss = cispo_objective(logps, rollout.old_logps, advantages, args.epsilon_high)
        else:
            policy_loss = clipped_objective(logps, rollout.old_logps, advantages, args.epsilon)
        per_token = policy_loss + args.beta * k3_kl(logps, ref_logps)
        mask = rollout.completion_mask
        metrics = dict(reward=rewards.mean(), kl=masked_mean(k3_kl(logps.detach(), ref_logps), mask),
                       answer_length=mask.sum(1).float().mean())
        if args.ppo_epochs > 1 or args.rollout_engine != "torch":
            ratio = importance_ratio(logps.detach(), rollout.old_logps)
            # k3 estimate of KL(pi_old || pi) on tokens pi_old sampled: rho - 1 - log rho, never negative
            metrics.update(ratio=masked_mean(ratio, mask),
                           kl_to_old=masked_mean(k3_kl_to_sampler(logps.detach(), rollout.old_logps), mask))
        return masked_mean(per_token, mask), aux_loss, metrics

    for step, window in run.steps(data):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        with run.autocast():  # rollouts first: G answers to each prompt from the rollout engine, scored
            for batch in window:
                batch.update(sample_and_score(engine, tokenizer, batch, args, reward_model, G, run.device))
        updates = 0
        for epoch in range(args.ppo_epochs):  # --ppo_epochs updates on the same rollouts (1: MiniMind's)
            # prompts weigh alike
            step_loss = run.accumulate(model, window, loss_fn, count=lambda batch: len(batch["prompt"]))
            if epoch == 0:  # right after a sync the sampler is the policy: rho must be 1
                check_sampler_ratio(engine, step - 1, run.step_metrics, args.ratio_check)
            if epoch and args.kl_stop and float(run.step_metrics["kl_to_old"]) > args.kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy has left the samples behind: no further update
                break
            lr = run.optimizer_step(optimizer)
            loss, updates = step_loss, updates + 1  # the loss of the update applied, not of one skipped
        run.log(loss=loss, lr=lr, **({"updates": updates} if args.ppo_epochs > 1 else {}),
                **({"staleness": engine.staleness(step - 1)} if args.rollout_engine != "torch" else {}))
        run.maybe_save(model, optimizer)
        if run.should_stop():
            break
    run.finish()


if __name__ == "__main__":
    main(args)
