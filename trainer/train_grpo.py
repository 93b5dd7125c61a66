"""GRPO: reinforcement learning without a critic, each answer judged against its siblings
(Shao et al., 2024, "DeepSeekMath", Group Relative Policy Optimization).

    cd trainer && python train_grpo.py                # from out/reason_512.pth (--reasoning 1) on rlaif-mini.jsonl
    python train_grpo.py --generation minimind-3      # upstream's minimind-3: from full_sft_768.pth, CISPO, rlaif.jsonl
    python trainer/train_grpo.py --reasoning 0 --reward_model_path /path/to/reward_model

For every prompt the policy samples G = --num_generations answers; with rewards r_1..r_G
    advantage  A_i = (r_i - mean(r)) / (std(r) + 1e-4)              (the same for every token of answer i)
    ratio      rho_t = pi(a_t) / pi_old(a_t)                        (pi_old = the policy that sampled)
    loss_t     = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * KL_t
    KL_t       = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (the k3 estimator of KL(pi || pi_ref))
averaged over all answer tokens. Rewards: rule rewards (format, verifiable answers) and an optional reward
model (trainer/rl/rewards.py). Writes out/grpo_{hidden}[_moe].pth.

--loss_type cispo (Chen et al., 2025, "MiniMax-M1", Clipped IS-weight Policy Optimization) replaces the PPO clip:
    loss_t     = -sg(min(rho_t, 1 + eps_high)) A_i logp_t + beta * KL_t
the importance weight is clipped and taken as a constant, so every token keeps a gradient (PPO-clip zeroes
the gradient of tokens whose ratio left the clip range). With one update per rollout (--ppo_epochs 1, MiniMind's
setting) rho = 1 and the two losses have the same gradient; --ppo_epochs K updates the policy K times on each
rollout batch, pi_old staying the policy that sampled (its log-probs kept from the first update's forward), so rho
moves away from 1 and the clip / the weight cap take effect. --kl_stop skips the rest of a batch's updates once an
update's forward finds the policy that far from pi_old (the k3 estimate of KL(pi_old || pi) over the answer
tokens). --rollout_engine sglang / vllm samples on a server (trainer/rl/engines.py) that gets the weights every
--sync_interval steps: pi_old is then the server's log-probs, so rho != 1 from the first update and the clip
corrects for the stale weights (logged: staleness, ratio, kl_to_old). --thinking_ratio R renders that share of the
prompts with thinking open (minimind-3's template opens <think>; default 0.9 there, 0 with a template that has no
thinking switch, which refuses a non-zero share; logged: thinking_share), the G answers of a prompt alike.
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
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table)
    args = parse_args(parser, argv, minimind3=dict(
        learning_rate=3e-7, max_seq_len=768, max_gen_len=1024, data_path="../dataset/rlaif.jsonl", reasoning=0,
        num_generations=6, beta=0.1, loss_type="cispo", epsilon_high=5.0))
    if args.num_generations < 2:  # the group's std of one answer is undefined: every advantage would be nan
        parser.error(f"--num_generations {args.num_generations}: GRPO judges each answer against its siblings, so it "
                     "needs at least 2 answers per prompt (for one answer per prompt use train_spo.py)")
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be at least 1")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from dataset.lm_dataset import RLAIFDataset
from trainer.args import data_file
from trainer.distributed import unwrap
from trainer.losses import (cispo_objective, clipped_objective, group_advantages, importance_ratio,  # the formulas
                            k3_kl, k3_kl_to_sampler, masked_mean)
from trainer.resume import Checkpoint
from trainer.rl.engines import check_sampler_ratio, make_engine
from trainer.rl.rewards import load_reward_model
from trainer.rl.sampling import completion_logprobs, sample_and_score, thinking_share
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    thinking_ratio = thinking_share(args.thinking_ratio, tokenizer)  # 0.9 / 0 by the template; refused
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = RLAIFDataset(data_file(args), tokenizer, args.max_seq_len,
                            on_bad_line="skip" if args.skip_bad_lines else "error")
    reward_model = load_reward_model(args, run)  # None: the rule rewards alone
    model = run.load_model()
    reference = run.frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the prompts
    checkpoint = Checkpoint(run, stream, model, optimizer)
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP
    # in-process, pi_old comes from the policy's own forward: the engine keeps no sampling log-probs
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir, logprobs=False)
    G = args.num_generations

    for step, window in run.steps(stream, checkpoint):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        with run.autocast():  # rollouts first: G answers to each prompt from the rollout engine, scored
            rollouts = [sample_and_score(engine, tokenizer, batch, args, reward_model, G, run.device,
                                         thinking_ratio)
                        for batch in window]
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every prompt weighs the same in the step: micro-batch b with n_b of the step's N prompts (all processes)
        #   loss = sum_b (n_b / N) * (token mean of loss_t over b's answers) + sum_b aux_b / (M * W)
        counts = [len(batch["prompt"]) for batch in window]
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        # pi_old is the policy that sampled. In-process: the policy itself, its log-probs taken from the first
        # update's forward (rho = 1 exactly, the PPO-clip gradient) and kept for the further updates of
        # --ppo_epochs, where rho moves away from 1. A server engine samples with weights up to --sync_interval
        # steps old: its own log-probs are pi_old, and the clip corrects for the staleness from the first update on.
        old_logps = [None if args.rollout_engine == "torch" else rollout.sample_logps for rollout, _ in rollouts]
        updates = 0
        for epoch in range(args.ppo_epochs):  # --ppo_epochs updates on the same rollouts (1: MiniMind's)
            sums = StepSums(run)
            for i, ((rollout, rewards), n) in enumerate(zip(rollouts, counts)):
                with run.grad_sync(model, last=i == len(window) - 1):
                    with run.autocast():
                        advantages = group_advantages(rewards, G)  # (r - mean) / (std + 1e-4) within each group
                        with torch.no_grad():
                            ref_logps, _ = completion_logprobs(reference, rollout)
                        logps, aux_loss = completion_logprobs(model, rollout)
                        if old_logps[i] is None:
                            old_logps[i] = logps.detach()
                        if args.loss_type == "cispo":
                            policy_loss = cispo_objective(logps, old_logps[i], advantages, args.epsilon_high)
                        else:
                            policy_loss = clipped_objective(logps, old_logps[i], advantages, args.epsilon)
                        mask = rollout.completion_mask
                        grpo = masked_mean(policy_loss + args.beta * k3_kl(logps, ref_logps), mask)
                    share, aux_share = n / total, aux_loss / len(window) / run.world_size
                    loss = grpo * share + aux_share
                    run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
                sums.add(share, loss=grpo, reward=rewards.mean(), answer_length=mask.sum(1).float().mean(),
                         kl=masked_mean(k3_kl(logps.detach(), ref_logps), mask))
                if thinking_ratio:  # the share of the step's prompts rendered with thinking open
                    sums.add(share, thinking_share=sum(rollout.thinking) / len(rollout.thinking))
                if args.ppo_epochs > 1 or args.rollout_engine != "torch":
                    # pi / pi_old, and the k3 estimate of KL(pi_old || pi) on tokens pi_old sampled (never negative)
                    sums.add(share, ratio=masked_mean(importance_ratio(logps.detach(), old_logps[i]), mask),
                             kl_to_old=masked_mean(k3_kl_to_sampler(logps.detach(), old_logps[i]), mask))
                sums.add(tokens=rollout.attention_mask.sum())  # real tokens, for tokens/s
                if args.use_moe:
                    sums.add(aux_loss=aux_share)
            metrics = sums.over_processes()
            if epoch == 0:  # right after a sync the sampler is the policy: rho must be 1
                check_sampler_ratio(engine, step - 1, metrics, args.ratio_check)
            if epoch and args.kl_stop and float(metrics["kl_to_old"]) > args.kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the policy has left the samples behind: no further update
                break
            run.scaler.unscale_(optimizer)  # float16's loss scale out of the gradients before clipping
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss, updates = metrics["loss"], updates + 1  # the loss of the update applied, not of one skipped

        run.log(stream, metrics, loss=loss, lr=lr, **({"updates": updates} if args.ppo_epochs > 1 else {}),
                **({"staleness": engine.staleness(step - 1)} if args.rollout_engine != "torch" else {}))
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):
            break
    run.finish()


if __name__ == "__main__":
    main(args)
