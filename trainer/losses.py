"""The losses the stages share, each with its formula: per-token and per-answer log-probabilities (DPO, RL), masked
means, and the policy-gradient objectives of the RL stages (GRPO, PPO, SPO, the agent). The next-token cross-entropy
of pretraining, SFT and LoRA is the model's own (labels=...); stage-specific losses (DPO's, distillation's, the
tag-weighted reasoning loss) stay in their train_*.py."""
import torch


def masked_mean(values, mask, dim=None):
    """Mean of values where mask is 1 (over everything, or along dim)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def gathered_logprobs(logits, targets, temperature=1.0, rows_per_chunk=4):
    """log softmax(logits / temperature)[target] = z_target - logsumexp(z), z = logits / temperature, in fp32.

    logits [N, T, V] (any dtype), targets [N, T] -> [N, T]; or [K, V], [K] -> [K]. The logsumexp runs over a few rows
    at a time, so no fp32 copy of all the logits exists at once (without gradients; with them each chunk's fp32 copy
    is kept for the backward, as log_softmax's output would be)."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() / temperature
    normaliser = torch.cat([(chunk.float() / temperature).logsumexp(-1) for chunk in logits.split(rows_per_chunk)])
    return picked - normaliser


def at_loss_positions(values, loss_index):
    """values[:, 1:] ([B, T] labels: the next-token targets; or per-token weights) flattened and taken at loss_index,
    the collator's flat positions of [B, T - 1] (those the model's forward(loss_index=...) gives logits for): [K]."""
    return values[:, 1:].reshape(-1).index_select(0, loss_index)


def sequence_logps(logits, labels, loss_index, reduction="mean"):
    """log pi(y|x) of each row's answer tokens, sum_t log p(labels[t + 1] | ...t) over the positions whose label counts:
    the sum, or the mean (length-normalised). The logits are those positions' only ([K, V], from the model's
    forward(loss_index=...)); the K log-probs go back to their places in a zero [B, T - 1] grid, whose rows are then
    summed (no boolean indexing: the host never waits for a count). In fp32, so long answers do not lose precision."""
    logps = gathered_logprobs(logits, at_loss_positions(labels, loss_index), rows_per_chunk=1024)  # [K], fp32
    # index_copy with distinct indices writes each place once: deterministic on CUDA, where index_add's atomics are not
    grid = logps.new_zeros(labels.shape[0] * (labels.shape[1] - 1)).index_copy(0, loss_index, logps)
    total = grid.view(labels.shape[0], -1).sum(-1)
    return total / (labels[:, 1:] != -100).sum(-1).clamp(min=1) if reduction == "mean" else total


def group_advantages(rewards, group_size):
    """Each reward relative to the other answers to the same prompt (adjacent groups of group_size)."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def k3_kl(logps, ref_logps):
    """Per-token estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp (always >= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


MAX_LOG_RATIO = 20.0  # |log rho| is clamped here: a sampler log-prob of -inf (vLLM sends -9999) must not give inf
DUAL_CLIP = 3.0       # for A < 0 the PPO objective is at most c * |A| per token (dual clip)


def importance_ratio(logps, old_logps):
    """rho = exp(logp - old_logp), the log-ratio clamped to +-MAX_LOG_RATIO so that it stays finite (exp(20) is
    5e8: far past every clip, and its gradient is 0 beyond the clamp)."""
    return torch.exp((logps - old_logps).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def k3_kl_to_sampler(logps, old_logps):
    """Per-token k3 estimate of KL(pi_old || pi) on tokens pi_old sampled: rho - 1 - log rho (>= 0), rho clamped."""
    ratio = importance_ratio(logps, old_logps)
    return ratio - 1 - ratio.log()


def clipped_objective(logps, old_logps, advantages, epsilon, dual_clip=DUAL_CLIP):
    """Per-token PPO-clip loss with the dual clip (Ye et al., 2020, "Mastering Complex Control in MOBA Games"):
        -min(rho A, clip(rho, 1 - eps, 1 + eps) A)                 for A >= 0
        -max(min(rho A, clip(rho, 1 - eps, 1 + eps) A), c A)       for A < 0
    rho = exp(logp - old_logp). Without the second line a negative advantage makes the loss grow with rho without
    bound (rho A -> -inf as the sampler's log-prob -> -inf); with rho <= c it changes nothing."""
    ratio = importance_ratio(logps, old_logps)
    if advantages.dim() == ratio.dim() - 1:  # one advantage per answer, broadcast over its tokens
        advantages = advantages.unsqueeze(-1)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    return -torch.where(advantages < 0, torch.max(surrogate, dual_clip * advantages), surrogate)


def cispo_objective(logps, old_logps, advantages, epsilon_high):
    """Per-token CISPO loss -sg(min(rho, 1 + eps_high)) A logp, rho = exp(logp - old_logp); no lower bound on
    the weight, as in MiniMax-M1. Bounded by construction: the weight is at most 1 + eps_high."""
    weight = importance_ratio(logps, old_logps).clamp(max=1 + epsilon_high).detach()
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    return -weight * advantages * logps
