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
    return parse_args(parser, argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from trainer.distributed import unwrap
from trainer.losses import importance_ratio, k3_kl
from trainer.rewards import MODEL_REWARD_CLIP, RULE_REWARD_RANGE
from trainer.rollout import completion_logprobs, masked_mean, sample_and_score, start_rl_run
from trainer.rollout_engine import check_sampler_ratio, make_engine

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
    run, tokenizer, data, reward_model = start_rl_run(args)
    low, high = RULE_REWARD_RANGE
    if reward_model is not None:
        low, high = low - MODEL_REWARD_CLIP, high + MODEL_REWARD_CLIP
    model = run.load_model()
    reference = run.frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    tracker = BetaTracker()
    model = run.prepare(model, optimizer, extras=dict(tracker=tracker))
    # in-process the samples are on-policy (no ratio): the engine keeps no sampling log-probs
    engine = make_engine(args, unwrap(model), tokenizer, run.tokenizer_dir, logprobs=False)
    step_rewards, step_logps = [], []

    def loss_fn(batch):
        rollout, rewards = batch["rollout"], rescale(batch["rewards"], low, high)
        advantages = rewards - tracker.baseline()
        with torch.no_grad():
            ref_logps, _ = completion_logprobs(reference, rollout)
        logps, aux_loss = completion_logprobs(model, rollout)
        mask = rollout.completion_mask
        answer_logp = masked_mean(logps, mask, dim=1)  # mean log-prob of each answer
        weighted_logp = answer_logp
        if args.rollout_engine != "torch":  # stale samples: each token weighted by sg(min(pi / pi_sample, 2))
            weight = importance_ratio(logps.detach(), rollout.sample_logps).clamp(max=STALE_WEIGHT_CAP)
            weighted_logp = masked_mean(weight * logps, mask, dim=1)
        kl = masked_mean(k3_kl(logps, ref_logps), mask, dim=1)
        step_rewards.append(rewards.mean())
        step_logps.append(answer_logp.detach().mean())
        metrics = dict(reward=rewards.mean(), baseline=torch.tensor(tracker.baseline()), kl=kl.detach().mean())
        if args.rollout_engine != "torch":  # pi / pi_sample, 1 right after a sync (checked below)
            metrics["ratio"] = masked_mean(importance_ratio(logps.detach(), rollout.sample_logps), mask)
        return (-advantages * weighted_logp + args.beta * kl).mean(), aux_loss, metrics

    for step, window in run.steps(data):
        engine.maybe_sync(unwrap(model), step - 1)  # a server engine gets the weights every --sync_interval steps
        with run.autocast():  # rollouts first: one answer to each prompt from the rollout engine, scored
            for batch in window:
                batch.update(sample_and_score(engine, tokenizer, batch, args, reward_model, device=run.device))
        loss = run.accumulate(model, window, loss_fn, count=lambda batch: len(batch["prompt"]))
        check_sampler_ratio(engine, step - 1, run.step_metrics, args.ratio_check)  # right after a sync: rho = 1
        lr = run.optimizer_step(optimizer)
        mean_reward, mean_logp = (float(x) / run.world_size for x in run.all_sum(
            torch.stack(step_rewards).mean(), torch.stack(step_logps).mean()))
        rho = tracker.update(mean_reward, mean_logp)  # the same on every process
        step_rewards.clear()
        step_logps.clear()
        run.log(loss=loss, lr=lr, rho=rho,
                **({"staleness": engine.staleness(step - 1)} if args.rollout_engine != "torch" else {}))
        run.maybe_save(model, optimizer, extras=dict(tracker=tracker))
        if run.should_stop():
            break
    run.finish()


if __name__ == "__main__":
    main(args)
