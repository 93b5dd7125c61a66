"""Rollouts of the single-turn RL stages (PPO, GRPO, SPO): sample answers to prompts and score their tokens.

- --thinking_ratio: that share of the prompts is rendered again from its messages with thinking open (minimind-3's
  template then ends the prompt inside <think>), drawn per prompt from the global RNG, which the trainers seed and
  resume; the rest keep the dataset's rendering (thinking closed: minimind-3's empty think block). An answer to a
  prompt that opened <think> is scored with that "<think>\n" before it, so the format reward and the answer after
  </think> read it whole;
- prompts are tokenised, cut from the left to --max_seq_len (so the generation prompt at the end always
  survives) and left-padded, so every row's answer starts at the same column;
- a rollout engine samples (trainer/rl/engines.py: in-process with the KV cache, or an SGLang / vLLM server);
- the completion mask covers the answer up to and including its first <|im_end|>;
- every log-prob pass (policy, old policy, reference, critic) gets the attention mask and positions
  counted from it, so padding never changes a score.
"""
import random
from dataclasses import dataclass

import torch

from common.chat import has_thinking_switch, opened_think, render
from trainer.losses import gathered_logprobs
from trainer.rl.engines import left_pad
from trainer.rl.rewards import rewards_for


@dataclass
class Rollout:
    input_ids: torch.Tensor        # [N, P + C] prompt (left-padded) + completion
    attention_mask: torch.Tensor   # [N, P + C] 1 on real prompt tokens and on the answer up to its end
    completion_mask: torch.Tensor  # [N, C]     1 on answer tokens up to and including the first eos
    prompt_length: int             # P: the answer starts at this column
    texts: list                    # the decoded answers (special tokens removed)
    temperature: float = 1.0       # log-probs are taken from the distribution the answers were sampled from
    sample_logps: torch.Tensor = None  # [N, C] the log-probs the rollout engine sampled the answer tokens with
    opened: list = None            # per answer: "<think>\n" when its prompt ended inside an opened think block, else ""
    thinking: list = None          # per answer: its prompt was rendered with thinking open (--thinking_ratio)

    @property
    def scored_texts(self):
        """The answers as the rewards read them: with the think block their prompt opened put back in front."""
        return [o + t for o, t in zip(self.opened or [""] * len(self.texts), self.texts)]


THINKING_DEFAULT = 0.9  # MiniMind's --thinking_ratio of its GRPO and PPO (minimind-3)


def thinking_share(ratio, tokenizer, default=THINKING_DEFAULT):
    """The share of prompts to open thinking in: --thinking_ratio (None: `default`) where the chat template has a
    thinking switch; 0 where it has none, which refuses a non-zero ratio (it would change nothing)."""
    if has_thinking_switch(tokenizer):
        return default if ratio is None else ratio
    if ratio:
        raise SystemExit(f"--thinking_ratio {ratio}: this tokenizer's chat template has no thinking switch (thinking "
                         "on and off render the same prompt), so the share would change nothing. Leave it out (or "
                         "0), or train with a tokenizer whose template opens <think> (minimind-3's).")
    return 0.0


def thinking_prompts(tokenizer, batch, ratio, rng=random):
    """(each prompt's text, whether it opens thinking) for a micro-batch of RLAIFDataset rows: each prompt opens
    thinking with probability `ratio` (one draw per prompt from rng, none at all for ratio 0), and is then rendered
    from its messages (and tools) with the switch on; the others keep the dataset's text (no switch passed)."""
    prompts = list(batch["prompt"])
    flags = [bool(ratio) and rng.random() < ratio for _ in prompts]
    tools = batch.get("tools") or [None] * len(prompts)
    for i, thinking in enumerate(flags):
        if thinking:
            prompts[i] = render(tokenizer, batch["conversation"][i], tools[i], thinking=True, generation_prompt=True)
    return prompts, flags


def prompt_rows(tokenizer, prompts, max_length):
    """Each prompt's token ids, cut from the left to max_length (the generation prompt at the end survives)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts]


def encode_prompts(tokenizer, prompts, max_length, device):
    """Left-truncated, left-padded prompt ids and attention mask."""
    return left_pad(prompt_rows(tokenizer, prompts, max_length), tokenizer.pad_token_id, device)


@torch.no_grad()
def sample(engine, tokenizer, prompts, max_prompt_length, max_new_tokens, samples_per_prompt=1, device="cpu",
           thinking=None):
    """`samples_per_prompt` answers to every prompt (answers of one prompt adjacent) from the rollout engine
    (trainer/rl/engines.py), with the log-probs it sampled them with (None when it returned none), and for each
    answer the think block its prompt opened. thinking: per prompt, whether it was rendered with thinking open."""
    rows = prompt_rows(tokenizer, prompts, max_prompt_length)
    contexts = [row for row in rows for _ in range(samples_per_prompt)]
    opened = [opened_think(tokenizer, row) for row in rows for _ in range(samples_per_prompt)]
    thinking = [bool(t) for t in (thinking or [False] * len(rows)) for _ in range(samples_per_prompt)]
    answers = engine.generate(contexts, max_new_tokens)
    prompt_ids, prompt_mask = left_pad(contexts, tokenizer.pad_token_id, device)
    width = max(len(ids) for ids, _ in answers)
    completion = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long)
    c_mask = torch.zeros((len(answers), width), dtype=torch.long)
    sample_logps = torch.zeros((len(answers), width))
    for i, (ids, logps) in enumerate(answers):  # each answer ends at its first eos (or at max_new_tokens)
        completion[i, :len(ids)], c_mask[i, :len(ids)] = torch.tensor(ids), 1
        if logps is not None:
            sample_logps[i, :len(ids)] = torch.tensor(logps)
    with_logps = answers[0][1] is not None  # an in-process engine asked for none (make_engine logprobs=False)
    texts = tokenizer.batch_decode([ids for ids, _ in answers], skip_special_tokens=True)
    return Rollout(torch.cat([prompt_ids, completion.to(device)], dim=1),
                   torch.cat([prompt_mask, c_mask.to(device)], dim=1), c_mask.to(device), prompt_ids.shape[1], texts,
                   engine.temperature, sample_logps=sample_logps.to(device) if with_logps else None, opened=opened,
                   thinking=thinking)


def sample_and_score(engine, tokenizer, batch, args, reward_model, samples_per_prompt=1, device="cpu",
                     thinking_ratio=0.0):
    """The rollout of one micro-batch of prompts (RLAIFDataset rows through pad_batch): samples_per_prompt answers
    to each from the rollout engine (no gradients), and their rewards [N] on the device. thinking_ratio: the share
    of prompts opened in thinking (thinking_share), drawn from the global RNG (seeded and resumed by the trainer)."""
    prompts, thinking = thinking_prompts(tokenizer, batch, thinking_ratio)
    rollout = sample(engine, tokenizer, prompts, args.max_seq_len, args.max_gen_len, samples_per_prompt, device,
                     thinking)
    rewards = rewards_for(rollout.scored_texts, batch, samples_per_prompt, reward_model, args.reasoning)
    return rollout, rewards.to(rollout.attention_mask.device)


def positions(attention_mask):
    """Position ids counted over real tokens only, so a left-padded row scores like an unpadded one."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_logprobs(model, rollout: Rollout):
    """([N, C] log-probs of the sampled answer tokens under `model`, 0 where the completion mask is 0;
    the forward's MoE load-balancing loss, 0 for a dense model). A trained MoE policy adds that loss to its
    own, or its router trains without the balancing term; frozen models (reference, old policy) ignore it."""
    answer = rollout.input_ids[:, rollout.prompt_length:]
    # logits only where they predict the answer: the last C + 1 positions, less the very last (its token is not sampled)
    out = model(rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions(rollout.attention_mask),
                logits_to_keep=answer.shape[1] + 1)
    logps = gathered_logprobs(out.logits[:, :-1], answer, rollout.temperature)  # fp32, a few rows at a time
    return logps * rollout.completion_mask, out.aux_loss
