"""PPO: reinforcement learning with a learned critic (Schulman et al., 2017, "Proximal Policy Optimization";
as used for RLHF by Ouyang et al., 2022).

    cd trainer && python train_ppo.py                 # from out/reason_512.pth (--reasoning 1) on rlaif-mini.jsonl
    python trainer/train_ppo.py --gae 0               # MiniMind's sequence-level variant
    cd trainer && python train_ppo.py --generation minimind-3   # upstream minimind-3: from full_sft, 2 updates a batch

Models: the actor (trained), an old actor (a copy refreshed every --update_old_actor_freq steps, the
pi_old of the ratio), a frozen reference, and a critic (a MiniMind decoder with a value head, trained).
As in MiniMind, answers are sampled from the current actor but the ratio is taken against that lagging
copy: rho_t measures how far the actor moved since the last refresh (up to --update_old_actor_freq - 1
updates), not the distance to the sampling policy of textbook PPO (there rho = 1 at the first update of a
rollout). --update_old_actor_freq 1 makes pi_old the sampling policy, as each rollout gets one update.
Per-token PPO (default, --gae 1), for each answer token t:
    reward     r_t = -kl_coef * (logp_old_t - ref_t), plus the answer's reward R on its last token
    GAE        delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1};  returns G_t = A_t + V_t
    actor      -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),  rho_t = pi(a_t) / pi_old(a_t), A whitened
    critic     0.5 * max((V_t - G_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - G_t)^2),  c = --cliprange_value
    loss       actor + vf_coef * critic
Sequence-level (--gae 0, MiniMind): one advantage per answer, A = R - V(last token), on the answer's summed
log-prob ratio, with a squared-error critic and kl_coef * KL(pi || ref) added to the loss.
--ppo_epochs K (upstream's --ppo_update_iters) updates actor and critic K times on each rollout batch, against the
pi_old, reference and values taken before the first update; --kl_stop (--early_stop_kl) skips a batch's remaining
updates once an update's forward finds the actor that far from pi_old (the k3 estimate of KL(pi_old || pi)).
With --rollout_engine sglang / vllm (trainer/rl/engines.py) a server samples with weights up to --sync_interval
steps old, and its log-probs take the old actor's place as pi_old. --thinking_ratio R renders that share of the
prompts with thinking open (minimind-3's template opens <think>; default 0.9 there, 0 with a template that has no
thinking switch, which refuses a non-zero share; logged: thinking_share). Writes out/ppo_actor_{hidden}[_moe].pth;
the critic is part of the resume file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the import root
from trainer.args import add_rl_arguments, common_parser, parse_args  # argparse only


def arguments(argv=None):
    parser = common_parser("MiniMind PPO", save_weight="ppo_actor", epochs=1, batch_size=2, learning_rate=8e-8,
                           accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                           data_path="../dataset/rlaif-mini.jsonl", from_weight=None)
    add_rl_arguments(parser, max_gen_len=1536)
    parser.add_argument("--critic_learning_rate", type=float, default=8e-8)
    parser.add_argument("--clip_epsilon", type=float, default=0.1)
    parser.add_argument("--vf_coef", type=float, default=0.5, help="weight of the critic loss")
    parser.add_argument("--kl_coef", type=float, default=0.02, help="KL penalty to the reference")
    parser.add_argument("--update_old_actor_freq", type=int, default=4, help="steps between pi_old refreshes")
    parser.add_argument("--gae", type=int, default=1, choices=[0, 1], help="1 = per-token GAE, 0 = sequence-level")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    # upstream minimind-3's PPO options (its names second where this project's GRPO has one first)
    parser.add_argument("--ppo_epochs", "--ppo_update_iters", type=int, default=1,
                        help="updates of actor and critic on each rollout batch")
    parser.add_argument("--kl_stop", "--early_stop_kl", type=float, default=0.0,
                        help="end a batch's updates once KL(pi_old || pi) passes this; 0 = never")
    parser.add_argument("--cliprange_value", type=float, default=None,
                        help="clip range of the critic's value change (--gae 1; default: --clip_epsilon)%(default).0s")
    parser.add_argument("--mini_batch_size", type=int, default=None,
                        help="prompts per update: only --batch_size, upstream's default (each update takes the "
                             "step's whole rollouts; see the README)%(default).0s")
    # --generation minimind-3: upstream minimind-3's defaults where they differ from MiniMind2's (README table);
    # pi_old is then the policy that sampled (--update_old_actor_freq 1), as in upstream
    args = parse_args(parser, argv, minimind3=dict(
        learning_rate=3e-7, critic_learning_rate=5e-7, max_seq_len=768, max_gen_len=1024,
        data_path="../dataset/rlaif.jsonl", reasoning=0, clip_epsilon=0.2, update_old_actor_freq=1, ppo_epochs=2,
        kl_stop=0.25))
    if args.cliprange_value is None:
        args.cliprange_value = args.clip_epsilon
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be at least 1")
    if args.mini_batch_size not in (None, args.batch_size):
        parser.error(f"--mini_batch_size {args.mini_batch_size}: each update here takes the step's whole rollouts "
                     f"(--batch_size {args.batch_size} prompts a micro-batch, --accumulation_steps micro-batches); "
                     "upstream's default, --mini_batch_size = --batch_size, is the same. For smaller updates lower "
                     "--batch_size")
    return args


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import copy

import torch
from torch import nn

from dataset.lm_dataset import RLAIFDataset
from trainer.args import data_file
from trainer.distributed import unwrap
from trainer.losses import clipped_objective, importance_ratio, k3_kl_to_sampler, masked_mean
from trainer.resume import Checkpoint
from trainer.rl.engines import check_sampler_ratio, make_engine
from trainer.rl.rewards import load_reward_model
from trainer.rl.sampling import completion_logprobs, positions, sample_and_score, thinking_share
from trainer.sampler import SampleStream
from trainer.trainer_utils import Run, StepSums, lr_at


class Critic(nn.Module):
    """A MiniMind decoder with a value head: one value per position."""

    def __init__(self, language_model):
        super().__init__()
        self.model = language_model.model
        self.value_head = nn.Linear(language_model.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        """(values [B, T], the decoder's MoE load-balancing loss)"""
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.value_head(out.last_hidden_state).squeeze(-1).float(), out.aux_loss


def completion_values(critic, rollout):
    """([N, C] value of the state from which each answer token is produced, the MoE balancing loss)."""
    values, aux_loss = critic(rollout.input_ids, rollout.attention_mask, positions(rollout.attention_mask))
    return values[:, rollout.prompt_length - 1:-1] * rollout.completion_mask, aux_loss


def gae(token_rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al., 2016) backwards along each answer.
    The value after an answer's last token is 0. Returns (advantages, returns), both 0 outside the mask."""
    advantages = torch.zeros_like(token_rewards)
    length = token_rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else 0.0
        next_advantage = advantages[:, t + 1] if t + 1 < length else 0.0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
    return advantages, (advantages + values) * mask


def whiten(values, mask):
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean) ** 2, mask).sqrt()
    return (values - mean) / (std + 1e-8) * mask


def token_rewards(rewards, old_logps, ref_logps, mask, kl_coef):
    """-kl_coef * (logp_old - ref) on every answer token, plus the answer's reward on its last token."""
    per_token = -kl_coef * (old_logps - ref_logps) * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    per_token[torch.arange(len(rewards)), last] += rewards
    return per_token


def main(args):
    run = Run(args)
    tokenizer = run.load_tokenizer()
    thinking_ratio = thinking_share(args.thinking_ratio, tokenizer)  # 0.9 / 0 by the template; refused
    with run.main_process_first():  # tokenised once, into the datasets cache the other processes read
        data = RLAIFDataset(data_file(args), tokenizer, args.max_seq_len,
                            on_bad_line="skip" if args.skip_bad_lines else "error")
    reward_model = load_reward_model(args, run)  # None: the rule rewards alone
    actor = run.load_model()
    old_actor = run.frozen_copy(actor)
    reference = run.frozen_copy(actor)
    critic = Critic(copy.deepcopy(actor)).to(run.device)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=args.learning_rate, fused=run.fused_adamw)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate, fused=run.fused_adamw)
    stream = SampleStream(data, args, run.rank, run.world_size, run.device)  # the resumable order of the prompts
    checkpoint = Checkpoint(run, stream, actor, optimizer,
                            extras=dict(critic=critic, critic_optimizer=critic_optimizer, old_actor=old_actor))
    checkpoint.restore()                                # --from_resume 1: all four models' states, position, RNG
    actor, critic = run.wrap(actor), run.wrap(critic)   # torch.compile, DDP
    # in-process, pi_old comes from the old actor's forward: the engine keeps no sampling log-probs
    engine = make_engine(args, unwrap(actor), tokenizer, run.tokenizer_dir, logprobs=False)

    for step, window in run.steps(stream, checkpoint):
        engine.maybe_sync(unwrap(actor), step - 1)  # a server engine gets the weights every --sync_interval steps
        with run.autocast():  # rollouts first: one answer to each prompt from the rollout engine, scored
            rollouts = [sample_and_score(engine, tokenizer, batch, args, reward_model, device=run.device,
                                         thinking_ratio=thinking_ratio)
                        for batch in window]
        lr = lr_at(*stream.schedule_position(), args.learning_rate, args.warmup_steps)  # MiniMind's cosine
        critic_lr = lr_at(*stream.schedule_position(), args.critic_learning_rate, args.warmup_steps)
        for opt, rate in ((optimizer, lr), (critic_optimizer, critic_lr)):
            for group in opt.param_groups:
                group["lr"] = rate
        # Every prompt weighs the same in the step (n_b of the step's N prompts, all processes):
        #   loss = sum_b (n_b / N) * (actor_b + vf_coef * critic_b) + sum_b aux_b / (M * W)
        counts = [len(batch["prompt"]) for batch in window]
        total = max(run.host_sum(sum(counts))[0], 1)  # all processes, summed on the CPU: no GPU wait
        # What every update of this batch compares against, taken once before the first: pi_old (the lagging copy
        # in-process; a server engine's own log-probs, its weights being stale), the reference, the critic's values
        fixed = []
        with torch.no_grad(), run.autocast():
            for rollout, rewards in rollouts:
                mask = rollout.completion_mask.float()
                old_logps = completion_logprobs(old_actor, rollout)[0] if args.rollout_engine == "torch" \
                    else rollout.sample_logps
                ref_logps, _ = completion_logprobs(reference, rollout)
                old_values, _ = completion_values(critic, rollout)
                if args.gae:
                    advantages, returns = gae(token_rewards(rewards, old_logps, ref_logps, mask, args.kl_coef),
                                              old_values, mask, args.gamma, args.lam)
                    advantages = whiten(advantages, mask)
                else:
                    returns = None
                fixed.append((mask, old_logps, ref_logps, old_values, advantages if args.gae else None, returns))
        updates = 0
        for epoch in range(args.ppo_epochs):  # --ppo_epochs updates on the same rollouts (1: MiniMind's)
            sums = StepSums(run)
            for i, ((rollout, rewards), n) in enumerate(zip(rollouts, counts)):
                mask, old_logps, ref_logps, old_values, advantages, returns = fixed[i]
                # both trained models wait for the window's last micro-batch before DDP reduces their gradients
                with run.grad_sync([actor, critic], last=i == len(window) - 1):
                    with run.autocast():
                        logps, actor_aux = completion_logprobs(actor, rollout)
                        values, critic_aux = completion_values(critic, rollout)
                        if args.gae:
                            actor_loss = masked_mean(clipped_objective(logps, old_logps, advantages,
                                                                       args.clip_epsilon), mask)
                            clipped_values = old_values + (values - old_values).clamp(-args.cliprange_value,
                                                                                      args.cliprange_value)
                            critic_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2,
                                                                      (clipped_values - returns) ** 2), mask)
                            ppo = actor_loss + args.vf_coef * critic_loss
                        else:  # MiniMind's sequence-level PPO
                            last = (mask.sum(1) - 1).clamp(min=0).long()
                            final_values = values[torch.arange(len(rewards)), last]
                            seq_advantages = rewards - final_values.detach()
                            ratio_logits = (logps - old_logps).sum(1)
                            actor_loss = clipped_objective(ratio_logits, torch.zeros_like(ratio_logits),
                                                           seq_advantages, args.clip_epsilon).mean()
                            critic_loss = ((final_values - rewards) ** 2).mean()
                            ppo = actor_loss + args.vf_coef * critic_loss + args.kl_coef * masked_mean(
                                logps - ref_logps, mask)
                    # both MoE routers keep their balancing term
                    share, aux_share = n / total, (actor_aux + critic_aux) / len(window) / run.world_size
                    loss = ppo * share + aux_share
                    run.scaler.scale(loss * run.world_size).backward()  # DDP averages gradients over the W processes
                sums.add(share, loss=ppo, reward=rewards.mean(), kl=masked_mean(logps.detach() - ref_logps, mask),
                         actor_loss=actor_loss.detach(), critic_loss=critic_loss.detach(),
                         answer_length=mask.sum(1).mean())
                if thinking_ratio:  # the share of the step's prompts rendered with thinking open
                    sums.add(share, thinking_share=sum(rollout.thinking) / len(rollout.thinking))
                if args.rollout_engine != "torch" or args.ppo_epochs > 1:  # pi / pi_old, 1 right after a sync
                    sums.add(share, ratio=masked_mean(importance_ratio(logps.detach(), old_logps), mask),
                             kl_to_old=masked_mean(k3_kl_to_sampler(logps.detach(), old_logps), mask))
                sums.add(tokens=rollout.attention_mask.sum())  # real tokens, for tokens/s
                if args.use_moe:
                    sums.add(aux_loss=aux_share)
            metrics = sums.over_processes()
            if epoch == 0:
                check_sampler_ratio(engine, step - 1, metrics, args.ratio_check)  # right after a sync: rho = 1
            if epoch and args.kl_stop and float(metrics["kl_to_old"]) > args.kl_stop:
                optimizer.zero_grad(set_to_none=True)  # the actor has left the samples behind: no further update
                critic_optimizer.zero_grad(set_to_none=True)
                break
            run.scaler.unscale_(optimizer)  # float16's loss scale out of the gradients before clipping
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)
            run.scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.unscale_(critic_optimizer)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
            run.scaler.step(critic_optimizer)
            critic_optimizer.zero_grad(set_to_none=True)
            run.scaler.update()  # once per update, after both optimizers
            applied, updates = metrics, updates + 1  # the metrics of the update applied, not of one skipped
        if step % args.update_old_actor_freq == 0:  # pi_old catches up with the actor
            old_actor.load_state_dict(unwrap(actor).state_dict())

        run.log(stream, applied, lr=lr, **({"updates": updates} if args.ppo_epochs > 1 else {}),
                **({"staleness": engine.staleness(step - 1)} if args.rollout_engine != "torch" else {}))
        if step % args.save_interval == 0 or stream.is_last_step:
            checkpoint.save()
        if run.should_stop(stream):
            break
    run.finish()


if __name__ == "__main__":
    main(args)
