"""Rewards for the RL stages: rule rewards that need no model, and an optional reward model.

Rule rewards (range 0 .. 2.5):
- reasoning format: +0.5 for the exact layout <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>, plus 0.25 for
  each of the four tags present exactly once (MiniMind's rule);
- verifiable answers (demo prompts carry "answers"): +1 when the text inside <answer> (or, when there is no such
  block, the answer after its think block) equals one of them after trimming spaces and trailing punctuation.
An answer to a prompt that opened <think> (minimind-3 with thinking on) is scored with that "<think>\n" in front
(trainer/rl/sampling.py), so its think block counts as its own.
A reward model (--reward_model_path) adds its score, clipped to [-3, 3]: any local Hugging Face
sequence-classification model, or one with a get_score(tokenizer, messages) method such as
InternLM2-1.8B-Reward. It is moved to the GPU only while scoring.
"""
import re

import torch

from common.chat import CALL, END_CALL, END_THINK, THINK, final_reply, split_thinking
from inference.tools import WEEKDAYS_ZH, is_error

TAGS = (THINK, END_THINK, "<answer>", "</answer>")
EXACT_LAYOUT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S)
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
RULE_REWARD_RANGE = (0.0, 2.5)
MODEL_REWARD_CLIP = 3.0


def format_reward(text: str) -> float:
    score = 0.5 if EXACT_LAYOUT.match(text.strip()) else 0.0
    return score + sum(0.25 for tag in TAGS if text.count(tag) == 1)


def normalise(answer: str) -> str:
    return re.sub(r"[\s。.!！,，]+$", "", answer.strip())


def extract_answer(text: str) -> str:
    """The <answer> block's text; without one, what follows the think block ("" when it is never closed)."""
    block = ANSWER_BLOCK.search(text)
    return normalise(block.group(1) if block else split_thinking(text)[1])


def answer_reward(text: str, answers) -> float:
    """1 when the (extracted) answer is one of the accepted answers, else 0; 0 when there are none."""
    return float(bool(answers) and extract_answer(text) in {normalise(a) for a in answers})


def rule_rewards(texts, extras, reasoning: bool):
    """Rule reward per answer; extras[i] holds the prompt's extra fields (e.g. "answers")."""
    return torch.tensor([(format_reward(t) if reasoning else 0.0) + answer_reward(t, e.get("answers") or [])
                         for t, e in zip(texts, extras)])


class RewardModel:
    """A local Hugging Face reward model, scored in batches and clipped to +-3.

    Held in half precision on a GPU (it only scores). resident=1 keeps it on the device; 0 has it wait on the CPU
    between scorings, leaving the GPU memory to the policy (the caching allocator reuses the freed blocks, so no
    empty_cache() is needed); -1 keeps it on the device when it fits beside the policy (fits_beside_the_policy)."""

    def __init__(self, path, device, batch_size=8, resident=-1):
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
        except (ValueError, KeyError):  # e.g. InternLM2-Reward registers only AutoModel, with get_score
            self.model = AutoModel.from_pretrained(path, trust_remote_code=True)
        if not hasattr(self.model, "get_score") and getattr(self.model.config, "num_labels", 1) != 1:
            raise SystemExit(f"{path}: a reward model needs one output (num_labels=1) or a get_score method")
        if self.tokenizer.pad_token is None:  # batched scoring pads; the score is read at each row's last token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.resident = torch.device(device), batch_size, resident
        from common.device import inference_dtype
        self.model.eval().requires_grad_(False).to(inference_dtype(self.device))
        self.resident = fits_beside_the_policy(self.model, self.device) if resident == -1 else bool(resident)
        if self.resident:
            self.model.to(self.device)

    @torch.no_grad()
    def score(self, conversations):
        """conversations: lists of messages ending with the assistant's answer -> [N] clipped scores."""
        self.model.to(self.device)
        scores = []
        try:
            if hasattr(self.model, "get_score"):
                scores = [float(self.model.get_score(self.tokenizer, c)) for c in conversations]
            else:
                for start in range(0, len(conversations), self.batch_size):
                    texts = [self._render(c) for c in conversations[start:start + self.batch_size]]
                    inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
                    scores += self.model(**inputs).logits[:, 0].float().tolist()
        finally:
            if not self.resident:
                self.model.to("cpu")
        return torch.tensor(scores).clamp(-MODEL_REWARD_CLIP, MODEL_REWARD_CLIP)

    def _render(self, messages):
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def fits_beside_the_policy(model, device, share=0.25):
    """Whether a reward model may stay on the device: on CUDA when its weights take under `share` of the GPU's free
    memory (torch.cuda.mem_get_info), which leaves the rest to the policy's rollouts and backward; elsewhere always
    (on a CPU nothing moves, and a Mac's GPU shares the same memory)."""
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return sum(p.numel() * p.element_size() for p in model.parameters()) < share * free_bytes


def load_reward_model(args, run, rules="answer format and verifiable answers"):
    """The --reward_model_path model, or None (with a message naming the rules) for rule rewards alone."""
    from common.device import print0
    if not args.reward_model_path or args.reward_model_path.lower() == "none":
        print0(f"No --reward_model_path: rewards come from the rules alone ({rules}).")
        return None
    return RewardModel(args.reward_model_path, run.device, resident=getattr(args, "reward_model_resident", -1))


def rewards_for(texts, batch, samples_per_prompt, reward_model, reasoning):
    """Rule rewards (+ the reward model's clipped score) of every answer; answers of one prompt are adjacent."""
    answers = batch.get("answers") or [None] * len(batch["prompt"])
    extras = [dict(answers=a) for a in answers for _ in range(samples_per_prompt)]
    rewards = rule_rewards(texts, extras, reasoning)
    if reward_model is not None:
        questions = [c for c in batch["conversation"] for _ in range(samples_per_prompt)]
        rewards = rewards + reward_model.score([q + [dict(role="assistant", content=t)] for q, t in zip(questions, texts)])
    return rewards


# ----------------------------------------------------------------------------------------------
# Agentic RL (train_agent.py): rewards of a multi-turn tool-use trajectory
# ----------------------------------------------------------------------------------------------

# A number stands alone: not inside a word, an identifier or a longer number ("v2", "12345" holds no 1234). Only ASCII
# letters count as word characters here, so that Chinese text around a number ("约等于62.1371英里") leaves it a number.
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])[-+]?\d+(?:\.\d+)?(?![A-Za-z0-9_.])")
AGENT_REWARD_CLIP = 3.0
# Closed sets of alternatives: an answer that names one of them and another of the same set names neither
ALTERNATIVES = [("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"), tuple(WEEKDAYS_ZH)]


def as_number(answer):
    """A gt value that is a number (thousands commas ignored) as a float, else None."""
    plain = str(answer).strip().replace(",", "")
    return float(plain) if NUMBER.fullmatch(plain) else None


def contains_answer(text, answer):
    """The answer is in the text: as a number equal to one in it (12 == 12.0; thousands commas ignored), else as a
    case-insensitive substring."""
    value, plain = as_number(answer), str(answer).strip().replace(",", "")
    if value is not None:
        return any(abs(float(n) - value) < 1e-6 for n in NUMBER.findall(str(text).replace(",", "")))
    return bool(plain) and plain.lower() in str(text).lower()


def given_answers(reply, gt):
    """The gt values that the final answer gives, judged by one rule so that listing candidates does not pay:
    the answer is the reply's <answer> block when it has one, else the whole reply;
    - numeric gt values (k of them) are compared with the answer's LAST k numbers (thousands commas ignored,
      12 == 12.0), each number matching at most one value: "0 1 2 ... 199" gives 199 and nothing else;
    - other values are case-insensitive substrings, and one of a closed set (weekdays) counts only when the
      answer names no other member of the set."""
    block = ANSWER_BLOCK.search(reply)
    answer = (block.group(1) if block else reply).replace(",", "")
    numeric = [g for g in gt if as_number(g) is not None]
    last_numbers = [float(n) for n in NUMBER.findall(answer)][-len(numeric):] if numeric else []
    found = []
    for g in gt:
        value = as_number(g)
        if value is not None:
            match = next((i for i, n in enumerate(last_numbers) if abs(n - value) < 1e-6), None)
            if match is not None:
                last_numbers.pop(match)
                found.append(g)
            continue
        if not contains_answer(answer, g):
            continue
        named = str(g).strip().lower()
        rivals = [word for group in ALTERNATIVES if named in group for word in group if word != named]
        if not any(word in answer.lower() for word in rivals):
            found.append(g)
    return found


def repetition(text, n=3, cap=0.5):
    """The share of repeated word 3-grams in the text, doubled and capped: 0 for text that never repeats itself."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return min(cap, 2 * cap * (len(grams) - len(set(grams))) / len(grams)) if grams else 0.0


def turns_opened(trajectory):
    """Each turn: whether its prompt opened a <think> (missing entries: no)."""
    return list(trajectory.opened_think) + [False] * (len(trajectory.turns) - len(trajectory.opened_think))


def final_answer(trajectory):
    """The final reply after its thinking; "" when there is none (the turn limit reached, or cut off)."""
    if trajectory.hit_turn_limit or trajectory.cut_off or not trajectory.turns:
        return ""
    return final_reply(trajectory.turns[-1], turns_opened(trajectory)[-1])


def agent_reward(trajectory, gt, tools, model_score=None):
    """The reward of one trajectory and its parts, each logged:
        answer      share of the gt answers its final answer gives (given_answers: one rule, no sprays) x 2.0
        valid_calls share of its tool calls that name an offered tool with arguments the tool accepts x 0.5
        unclosed    unbalanced <tool_call> / <think> tags over all turns (0, 1, 2 ...); a <think> that the
                    prompt opened (minimind-3's generation prompt with thinking on) counts as the turn's own x -0.5
        turn_limit  1 when the last allowed turn still called tools                              x -0.5
        repetition  repeated 3-grams in the final reply (0 .. 0.5)                               x -1
        model       (with a reward model) its score of the final answer when the trajectory called no tool,
                    clipped to [-3, 3] (agent_model_scores; MiniMind's R_rm term)                x 1
    total clipped to [-3, 3]; success: every gt answer is in the final answer."""
    offered = {t["function"]["name"] for t in tools or []}
    calls = [(c, r) for turn_calls, results in zip(trajectory.calls, trajectory.results)
             for c, r in zip(turn_calls, results)]
    valid = sum(c["name"] in offered and not is_error(r) for c, r in calls)
    opened = turns_opened(trajectory)
    final = final_answer(trajectory)
    found = given_answers(final, gt) if gt else []
    unclosed = sum(abs(turn.count(CALL) - turn.count(END_CALL))
                   + abs(turn.count(THINK) + was_open - turn.count(END_THINK))  # was_open: the prompt's <think>
                   for turn, was_open in zip(trajectory.turns, opened))
    parts = dict(answer=len(found) / len(gt) if gt else 0.0, valid_calls=valid / len(calls) if calls else 0.0,
                 unclosed=float(unclosed), turn_limit=float(trajectory.hit_turn_limit), repetition=repetition(final))
    if model_score is not None:
        parts["model"] = float(model_score)
    total = 2.0 * parts["answer"] + 0.5 * parts["valid_calls"] - 0.5 * parts["unclosed"] - 0.5 * parts["turn_limit"] \
        - parts["repetition"] + parts.get("model", 0.0)
    return dict(total=max(-AGENT_REWARD_CLIP, min(AGENT_REWARD_CLIP, total)), success=float(bool(gt) and
                len(found) == len(gt)), **parts)


def agent_model_scores(trajectories, conversations, reward_model):
    """The reward model's score (RewardModel.score: clipped to [-3, 3]) of each trajectory's final answer, after the
    conversation that asked for it, for the trajectories that answered without calling any tool; 0 for the others.
    None without a reward model. This is MiniMind's term (train_agent.py: an answer without tool calls gets
    reward += RM score): such an answer has no tool result to check, so a judge of its quality is the signal; a
    trajectory that called tools is judged by its gt answers and calls instead. conversations: each trajectory's
    messages up to the request."""
    if reward_model is None:
        return None
    scores = [0.0] * len(trajectories)
    judged = [k for k, t in enumerate(trajectories) if not any(t.calls) and final_answer(t).strip()]
    if judged:
        asked = [list(conversations[k]) + [dict(role="assistant", content=final_answer(trajectories[k]).strip())]
                 for k in judged]
        for k, score in zip(judged, reward_model.score(asked).tolist()):
            scores[k] = score
    return scores
