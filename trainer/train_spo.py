"""SPO: single-stream policy optimisation, one answer per prompt and an adaptive baseline instead of a group
or a critic (in the spirit of "Single-stream Policy Optimization", 2025).

    cd trainer && python train_spo.py                 # from out/reason_512.pth (--reasoning 1) on rlaif-mini.jsonl

A Beta(alpha, beta) tracker estimates the expected (rescaled) reward; its mean is the baseline:
    r_hat  = clip((r - r_min) / (r_max - r_min), 0, 1)         rewards rescaled into the tracker's [0, 1]
    A      = r_hat - alpha / (alpha + beta)
    loss   = -A * mean_t log pi(a_t) + beta_kl * mean_t KL_t    (REINFORCE with the baseline, k3 KL to the reference)
After each step the tracker forgets at a rate set by how far the policy moved, D = |change of the mean
answer log-prob between steps|:
    rho = clip(2^(-D / 0.06), 0.5, 0.96);   alpha <- rho alpha + r_hat_mean,  beta <- rho beta + (1 - r_hat_mean)
The tracker is part of the resume file. Writes out/spo_{hidden}[_moe].pth.
With a server rollout engine (--rollout_engine sglang / vllm) the answers come from weights up to --sync_interval
steps old, so each token's log-prob is weighted by the truncated importance weight sg(min(pi / pi_sample, 2)).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_rl_arguments, common_parser, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind SPO", save_weight="spo", epochs=1, batch_size=2, learning_rate=1e-7,
                           accumulation_steps=4, log_interval=1, save_interval=10, max_seq_len=66,
                           data_path="../dataset/rlaif-mini.jsonl", from_weight=None)
    add_rl_arguments(parser, max_gen_len=1536)
    parser.add_argument("--beta", type=float, default=0.02, help="weight of the KL penalty to the reference")
    # --generation minimind-3 (upstream has no SPO for it): the prompts, answers, data and start of its GRPO / PPO
    return parse_args(parser, argv, minimind3=dict(max_seq_len=768, max_gen_len=1024,
                                                   data_path="../dataset/rlaif.jsonl", reasoning=0))


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from dataset.lm_dataset import RLAIFDataset
from trainer.args import data_file
from trainer.distributed import unwrap
from trainer.losses import importance_ratio, k3_kl, masked_mean
from trainer.resume import Checkpoint
from trainer.rl.engines import check_sampler_ratio, make_engine
from trainer.rl.rewards import MODEL_REWARD_CLIP, RULE_REWARD_RANGE, load_reward_model
from trainer.rl.sampling import completion_logprobs, sample_and_score, thinking_share
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at

STALE_WEIGHT_CAP = 2.0  # a server engine's samples: truncated importance weights (as V-trace truncates rho)


class BetaTracker:
    """Adaptive Beta-distribution estimate of the expected reward in [0, 1] (state: alpha, beta, last logp)."""

    def __init__(self, alpha=1.0, beta=1.0, half_life=0.06, rho_min=0.5, rho_max=0.96):
        self.alpha, self.beta, self.last_logp = alpha, beta, None
        self.half_life, self.rho_min, self.rho_max = half_life, rho_min, rho_max

    def baseline(self):
        return self.alpha / (self.alpha + self.beta)

    def update(self, mean_reward, mean_logp):
        """Forget by rho = clip(2^(-|change of mean logp| / half_life)), then add this step's evidence."""
        drift = 0.0 if self.last_logp is None else abs(mean_logp - self.last_logp)
        rho = min(max(2 ** (-drift / self.half_life), self.rho_min), self.rho_max)
        self.alpha = rho * self.alpha + mean_reward
        self.beta = rho * self.beta + (1 - mean_reward)
        self.last_logp = mean_logp
        return rho

    def state_dict(self):
        return dict(alpha=self.alpha, beta=self.beta, last_logp=self.last_logp)

    def load_state_dict(self, state):
        self.alpha, self.beta, self.last_logp = state["alpha"], state["beta"], state["last_logp"]


def rescale(rewards, low, high):
    return ((rewards - low) / (high - low)).clamp(0, 1)


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    thinking_ratio = thinking_share(args.thinking_ratio, tokenizer)  # 0.9 / 0 by the template; refused
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = RLAIFDataset(data_file(args), tokenizer, args.max_seq_len,
                            on_bad_line="skip" if args.skip_bad_lines else "error")
    reward_model = load_reward_model(args, run)  # None: the rule rewards alone
    low, high = RULE_REWARD_RANGE
    if reward_model is not None:
        low, high = low - MODEL_REWARD_CLIP, high + MODEL_REWARD_CLIP
    model = run.load_model()
    reference = run.frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    tracker = BetaTracker()
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the prompts
    checkpoint = Checkpoint(run, stream, model, optimizer, extras=dict(tracker=tracker))
    checkpoint.restore()                                # --from_resume 1: weights, optimizer, tracker, position, RNG
    model = run.wrap(model)                             # torch.compile, DDP
    # in-process the samples are on-policy (no ratio): the engine keeps no sampling log-probs
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir, logprobs=False)

    for step, window in run.steps(stream, checkpoint):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        with run.autocast():  # rollouts first: one answer to each prompt from the rollout engine, scored
            rollouts = [sample_and_score(engine, tokenizer, batch, args, reward_model, device=run.device,
                                         thinking_ratio=thinking_ratio)
                        for batch in window]
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every prompt weighs the same in the step (n_b of the step's N prompts, all processes):
        #   loss = sum_b (n_b / N) * mean_i(-A_i * logp_i + beta_kl * KL_i) + sum_b aux_b / (M * W)
        counts = [len(batch["prompt"]) for batch in window]
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        sums, step_rewards, step_logps = StepSums(run), [], []
        for i, ((rollout, rewards), n) in enumerate(zip(rollouts, counts)):
            with run.grad_sync(model, last=i == len(window) - 1):
                with run.autocast():
                    rewards = rescale(rewards, low, high)
                    advantages = rewards - tracker.baseline()
                    with torch.no_grad():
                        ref_logps, _ = completion_logprobs(reference, rollout)
                    logps, aux_loss = completion_logprobs(model, rollout)
                    mask = rollout.completion_mask
                    answer_logp = masked_mean(logps, mask, dim=1)  # mean log-prob of each answer
                    weighted_logp = answer_logp
                    if args.rollout_engine != "torch":  # stale samples: each token weighs sg(min(pi / pi_sample, 2))
                        weight = importance_ratio(logps.detach(), rollout.sample_logps).clamp(max=STALE_WEIGHT_CAP)
                        weighted_logp = masked_mean(weight * logps, mask, dim=1)
                    kl = masked_mean(k3_kl(logps, ref_logps), mask, dim=1)
                    spo = (-advantages * weighted_logp + args.beta * kl).mean()
                share, aux_share = n / total, aux_loss / len(window) / run.world_size
                loss = spo * share + aux_share
                run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
            step_rewards.append(rewards.mean())
            step_logps.append(answer_logp.detach().mean())
            sums.add(share, loss=spo, reward=rewards.mean(), baseline=tracker.baseline(), kl=kl.detach().mean())
            if thinking_ratio:  # the share of the step's prompts rendered with thinking open
                sums.add(share, thinking_share=sum(rollout.thinking) / len(rollout.thinking))
            if args.rollout_engine != "torch":  # pi / pi_sample, 1 right after a sync (checked below)
                sums.add(share, ratio=masked_mean(importance_ratio(logps.detach(), rollout.sample_logps), mask))
            sums.add(tokens=rollout.attention_mask.sum())  # real tokens, for tokens/s
            if args.use_moe:
                sums.add(aux_loss=aux_share)
        metrics = sums.over_processes()
        check_sampler_ratio(engine, step - 1, metrics, args.ratio_check)  # right after a sync: rho = 1
        run.scaler.unscale_(optimizer)  # float16's loss scale out of the gradients before clipping
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        mean_reward, mean_logp = (float(x) / run.world_size for x in run.all_sum(
            torch.stack(step_rewards).mean(), torch.stack(step_logps).mean()))
        rho = tracker.update(mean_reward, mean_logp)  # the same on every process

        run.log(stream, metrics, lr=lr, rho=rho,
                **({"staleness": engine.staleness(step - 1)} if args.rollout_engine != "torch" else {}))
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):
            break
    run.finish()


if __name__ == "__main__":
    main(args)
