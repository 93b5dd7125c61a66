"""Multi-turn tool-use rollouts, token in and token out: the trajectories the agentic RL stage learns from.

A trajectory is one token sequence: the prompt (the conversation rendered with its tools and the generation prompt),
then every turn's generated ids exactly as they were sampled, each followed - when the turn called tools - by the
observation: the tool results as the chat template renders a tool turn, up to the next generation prompt.

    prompt | generated turn 1 ... <|im_end|> | observation 1 | generated turn 2 ... <|im_end|> | ...
    loss:      1  1  1  ...   1                  0 0 0 0          1  1  ...     1

The generated ids are never decoded and encoded again: decoding is only for reading the tool calls, and the
observation is the text the template adds after the assistant turn, tokenised on its own. (Re-rendering the whole
conversation and slicing it by length, as MiniMind's own agent trainer does, breaks the trajectory wherever the
re-encoded text tokenises differently from what was sampled.) Generated tokens - the <|im_end|> that ends a turn
included - carry the loss; observation tokens carry neither loss nor KL. All samples of a batch step through the
turns together: each turn is one batched call of the rollout engine (trainer/rl/engines.py: in-process with the
KV cache, or an SGLang / vLLM server) over every trajectory still running.
"""
import random
from dataclasses import dataclass, field

import torch

from common.chat import final_reply, opened_think, parse_tool_calls, render
from inference.tools import BUILTIN
from trainer.losses import gathered_logprobs


@dataclass
class Trajectory:
    prompt_ids: list                     # the conversation up to the first generation prompt
    ids: list = field(default_factory=list)          # everything after the prompt: turns and observations
    loss_mask: list = field(default_factory=list)    # 1 on generated tokens, 0 on observation tokens
    sample_logps: list = field(default_factory=list)  # the sampler's log-prob of each generated token, 0 elsewhere
    turns: list = field(default_factory=list)        # each turn's generated text
    calls: list = field(default_factory=list)        # each turn's tool calls: [{"name", "arguments"}], [] for none
    results: list = field(default_factory=list)      # each turn's tool results (JSON strings), [] for none
    opened_think: list = field(default_factory=list)  # each turn: its context ended inside an open <think>
    thinking: bool = False                            # rendered with the thinking switches on
    hit_turn_limit: bool = False                      # the last allowed turn still called tools
    cut_off: bool = False                             # a turn reached its token budget without <|im_end|>
    prompt_too_long: bool = False                     # the prompt alone filled max_total_tokens: nothing sampled

    @property
    def finished(self):
        """Done: it answered without a call, hit the turn limit, or was cut off."""
        return self.hit_turn_limit or self.cut_off or bool(self.turns and not self.calls[-1])


def observation_text(tokenizer, messages, assistant, tool_messages, tools, thinking):
    """What the chat template writes after an assistant turn's <|im_end|>: the tool turn(s) and the next generation
    prompt. Taken from two renderings of the conversation - with the assistant turn, and with the tool results
    and a generation prompt after it - so it is exactly the text a later render would hold there."""
    before = render(tokenizer, messages + [assistant], tools, thinking or None)
    after = render(tokenizer, messages + [assistant] + tool_messages, tools, thinking or None, generation_prompt=True)
    cut = before.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
    if after[:cut] != before[:cut]:
        raise ValueError("the chat template renders the conversation before the tool results differently once they "
                         "are added: the observation cannot be appended to the sampled turn")
    return after[cut:]


def run_trajectories(engine, tokenizer, conversations, tools, samples_per_prompt=1, max_turns=3, max_new_tokens=256,
                     thinking_ratio=0.0, max_total_tokens=4096, rng=None, toolset=None):
    """Trajectories for every conversation (samples_per_prompt each, adjacent), run turn by turn together.

    conversations: lists of messages up to the user's request; tools: each conversation's tools (OpenAI layout).
    thinking_ratio: the share of trajectories rendered with the thinking switch on. A trajectory whose turn calls
    tools has them run by toolset (inference/tools.py ToolSet: the built-in tools, and --tools plug-ins; any failure,
    a slow tool or a long answer comes back as an error result, never an exception) and continues, up to max_turns;
    one that reaches max_total_tokens stops there, as cut off,
    and one whose prompt alone fills it is marked prompt_too_long and gets no turn. A turn counts as calling tools
    only when its reply (after any thinking) is nothing but <tool_call> blocks, as the server reads replies;
    otherwise it is the final answer."""
    rng = rng or random.Random(0)  # anything with .random(): the trainer passes the global RNG it resumes
    toolset = toolset or BUILTIN
    runs = []  # (trajectory, its messages so far, its tools)
    for messages, offered in zip(conversations, tools):
        for _ in range(samples_per_prompt):
            thinking = rng.random() < thinking_ratio
            # thinking off passes no switch: the turns look as in the SFT data the model learnt its calls from
            # (minimind-3's default is an empty think block, this project's template writes none)
            prompt = render(tokenizer, messages, offered, thinking or None, generation_prompt=True)
            trajectory = Trajectory(tokenizer(prompt, add_special_tokens=False).input_ids, thinking=thinking)
            if len(trajectory.prompt_ids) >= max_total_tokens:  # no room for a single token: nothing to learn from
                trajectory.prompt_too_long = trajectory.cut_off = True
            runs.append((trajectory, [dict(m) for m in messages], offered))
    for turn in range(max_turns):
        for trajectory, _, _ in runs:  # no room left for another turn
            if not trajectory.finished and len(trajectory.prompt_ids) + len(trajectory.ids) >= max_total_tokens:
                trajectory.cut_off = True
        active = [r for r in runs if not r[0].finished]
        if not active:
            break
        contexts = [t.prompt_ids + t.ids for t, _, _ in active]
        rooms = [min(max_new_tokens, max_total_tokens - len(c)) for c in contexts]
        samples = engine.generate(contexts, max(rooms))
        for (trajectory, messages, offered), context, room, (ids, logps) in zip(active, contexts, rooms, samples):
            ids, logps = ids[:room], logps[:room]  # each trajectory within its own room
            text = tokenizer.decode(ids, skip_special_tokens=True)  # for reading the calls only
            trajectory.ids += ids
            trajectory.loss_mask += [1] * len(ids)
            trajectory.sample_logps += logps
            trajectory.turns.append(text)
            trajectory.opened_think.append(bool(opened_think(tokenizer, context)))
            ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
            calls = (parse_tool_calls(final_reply(text, trajectory.opened_think[-1])) or []) if ended else []
            trajectory.calls.append(calls)
            results = [toolset.run(c["name"], c["arguments"]) for c in calls]  # bounded, and never raises
            trajectory.results.append(results)
            if not ended:
                trajectory.cut_off = True
            if not calls:
                continue
            if turn == max_turns - 1:
                trajectory.hit_turn_limit = True
                continue
            assistant = {"role": "assistant", "content": text}
            tool_messages = [{"role": "tool", "content": r} for r in results]
            observation = tokenizer(observation_text(tokenizer, messages, assistant, tool_messages, offered,
                                                     trajectory.thinking), add_special_tokens=False).input_ids
            messages += [assistant] + tool_messages
            trajectory.ids += observation
            trajectory.loss_mask += [0] * len(observation)
            trajectory.sample_logps += [0.0] * len(observation)
    return [t for t, _, _ in runs]


def pad_trajectories(trajectories, pad_id):
    """Right-padded tensors of a list of trajectories for one forward: input_ids and attention_mask [N, L], and
    loss_mask / sample_logps [N, L - 1] aligned with the predictions (position t predicts token t + 1)."""
    rows = [t.prompt_ids + t.ids for t in trajectories]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.long)
    sample_logps = torch.zeros((len(rows), width - 1))
    for i, (row, t) in enumerate(zip(rows, trajectories)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        start = len(t.prompt_ids) - 1  # the prediction of the first token after the prompt
        loss_mask[i, start:start + len(t.ids)] = torch.tensor(t.loss_mask, dtype=torch.long)
        sample_logps[i, start:start + len(t.ids)] = torch.tensor(t.sample_logps)
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, sample_logps=sample_logps)


def trajectory_logprobs(model, padded, temperature=1.0):
    """[N, L - 1] log-probs of every next token under `model` (at the sampling temperature), 0 where the loss mask
    is 0; and the forward's MoE balance loss."""
    out = model(padded["input_ids"], attention_mask=padded["attention_mask"])
    logps = gathered_logprobs(out.logits[:, :-1], padded["input_ids"][:, 1:], temperature)  # every next token
    return logps * padded["loss_mask"], out.aux_loss
