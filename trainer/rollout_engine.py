"""Rollout engines: where the RL stages' samples come from (--rollout_engine). One small interface:

    engine.generate(contexts, max_new_tokens) -> [(ids, logps)]   prompts as token ids in; for each, the sampled ids
                                                                   (up to and including <|im_end|>) and each one's
                                                                   log-prob under the distribution it was drawn from
    engine.maybe_sync(model, step)                                 take the policy's weights after step `step`
    engine.staleness(step)                                         updates the sampling weights lag behind

- torch:  in-process, transformers generate on the live policy (nothing to sync, never stale);
- sglang: an SGLang server (or this project's), native /generate with input_ids and return_logprob; new weights every
          --sync_interval steps as a folder it loads natively (a dense MiniMind2 as Llama, minimind-3 as Qwen3) through
          /update_weights_from_disk. Protocol as in SGLang 0.5.1 - 0.5.23 (read from its source);
- vllm:   a vLLM server, OpenAI-compatible /v1/completions with token-id prompts, logprobs 0 and
          return_tokens_as_token_ids; the same folder through its development control plane, POST /collective_rpc
          {"method": "reload_weights", "kwargs": {"weights_path": ...}} (VLLM_SERVER_DEV_MODE=1), then
          /reset_prefix_cache. Start it with --logprobs-mode processed_logprobs (vLLM >= 0.10.2), so its log-probs are
          the sampling distribution's (temperature applied), as SGLang's are by default.
Between syncs the engine samples with older weights; the trainers take the importance ratio against the log-probs
the engine returns, so PPO-clip / CISPO correct for it, and log the staleness. An engine that is down, slow or
answers something else stops the run with the URL and what was expected, after --rollout_timeout seconds at most.
"""
import json
import os
import shutil
import socket
import urllib.error
import urllib.request

import torch

from model.hf_export import engine_format, save_for_engines
from trainer.rollout import left_pad


class RolloutEngineError(RuntimeError):
    pass


class TorchEngine:
    """In-process rollout engine: batched sampling with the KV cache (transformers generate), returning each
    sampled token's log-probability under the distribution it was drawn from (temperature applied)."""

    def __init__(self, model, tokenizer, temperature=1.0, min_new_tokens=0, logprobs=True):
        self.model, self.tokenizer, self.temperature = model, tokenizer, temperature
        self.min_new_tokens = min_new_tokens  # the RL benchmark forces full-length answers
        # logprobs=False: return None for them and keep no scores, which generate would hold as [N, steps, V]
        # (1536 steps x 16 answers x 6400 = 0.6 GB fp32): GRPO / PPO / SPO in-process take pi_old from a forward
        self.logprobs = logprobs

    @torch.no_grad()
    def generate(self, contexts, max_new_tokens):
        """[(ids, log-probs)] for each context (a list of token ids): ids up to and including the first eos, or
        max_new_tokens of them when there is none."""
        tokenizer, model = self.tokenizer, self.model
        ids, mask = left_pad(contexts, tokenizer.pad_token_id, next(model.parameters()).device)
        was_training = model.training
        model.eval()
        # top_k=0 and top_p=1.0 switch those warpers off, so the scores generate returns are logits / temperature:
        # the sampling distribution itself (transformers' GenerationMixin._sample records them before sampling).
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=self.min_new_tokens, do_sample=True, temperature=self.temperature,
                             top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True,
                             output_scores=self.logprobs)
        model.train(was_training)
        new = out.sequences[:, ids.shape[1]:]
        logps = [None] * len(new)
        if self.logprobs:
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [N, steps, V], on the device
            logps = torch.gather(scores, 2, new.unsqueeze(-1)).squeeze(-1).tolist()  # only [N, steps] to the host
        samples = []
        for row, row_logps in zip(new.tolist(), logps):
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            samples.append((row[:end], row_logps and row_logps[:end]))
        return samples

    def maybe_sync(self, model, steps_done):
        pass  # it samples with the live weights

    def staleness(self, steps_done):
        return 0


def post_json(url, body, timeout, expected):
    """POST body as JSON; the parsed answer. A server that cannot be reached, does not answer within timeout
    seconds, answers an HTTP error or something that is not JSON raises RolloutEngineError naming the URL and
    `expected` (what the answer should have been)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return read_json(request, url, timeout, expected)


def read_json(request, url, timeout, expected):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode("utf-8", "replace")
        raise RolloutEngineError(f"rollout engine {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError) as e:  # a timeout comes either bare or wrapped
        if isinstance(getattr(e, "reason", e), (socket.timeout, TimeoutError)):
            raise RolloutEngineError(f"rollout engine {url} did not answer within {timeout:g} s "
                                     "(--rollout_timeout)") from None
        raise RolloutEngineError(f"cannot reach the rollout engine at {url} ({e.reason}): is the server running "
                                 "there? (see the README's rollout engine runbook)") from None
    except ConnectionError as e:
        raise RolloutEngineError(f"rollout engine {url} dropped the connection ({e})") from None
    if not raw.strip():
        return {}  # vLLM's control endpoints answer 200 with an empty body
    try:
        return json.loads(raw)
    except ValueError:
        raise RolloutEngineError(f"rollout engine {url} answered something that is not JSON ({raw[:200]!r}); "
                                 f"expected {expected}") from None


def checked_sample(ids, logps, url, expected):
    """(ids, logps) once they are lists of ints and numbers of one length; else RolloutEngineError."""
    if (not isinstance(ids, list) or not isinstance(logps, list) or len(ids) != len(logps) or not ids
            or not all(isinstance(t, int) for t in ids) or not all(isinstance(x, (int, float)) for x in logps)):
        raise RolloutEngineError(f"rollout engine {url} answered a sample without matching token ids and log-probs; "
                                 f"expected {expected}")
    return ids, [float(x) for x in logps]


class HTTPEngine:
    """What the two server engines share: the weight folders and the sync cadence. The folder goes to
    sync_dir/step_N (written whole, then renamed into place; the previous one removed), which the server must be
    able to read: the same machine or a shared filesystem."""

    def __init__(self, url, tokenizer, temperature, tokenizer_dir, sync_dir, sync_interval, timeout, config):
        try:
            engine_format(config)
        except ValueError as e:
            raise SystemExit(f"--rollout_engine {self.name}: {e}")
        self.url, self.tokenizer, self.temperature = url.rstrip("/"), tokenizer, temperature
        self.tokenizer_dir, self.sync_dir, self.sync_interval, self.timeout = (tokenizer_dir, sync_dir, sync_interval,
                                                                               timeout)
        self.synced_step = None  # the step whose weights the engine holds; None before the first sync
        self.dtype = torch.bfloat16  # what GPU engines serve in

    def maybe_sync(self, model, steps_done):
        """Send the policy's weights after `steps_done` optimizer steps: at the start (the engine may have been
        started with other weights; on a resume, with the last saved ones) and every sync_interval steps. Under
        torchrun the first process writes and sends them while the others wait."""
        if self.synced_step is not None and (steps_done % self.sync_interval or steps_done == self.synced_step):
            return
        if int(os.environ.get("RANK", 0)) == 0:
            self.load(self.save(model, steps_done), steps_done)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.synced_step = steps_done

    def staleness(self, steps_done):
        """Optimizer steps the sampling weights lag behind the policy (0 right after a sync)."""
        return steps_done - self.synced_step

    def save(self, model, step):
        folder = os.path.join(self.sync_dir, f"step_{step}")
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_for_engines(model, partial, self.tokenizer_dir, self.dtype)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        for old in os.listdir(self.sync_dir):  # the engine has the earlier folders loaded already
            if old.startswith("step_") and old != os.path.basename(folder):
                shutil.rmtree(os.path.join(self.sync_dir, old), ignore_errors=True)
        return os.path.abspath(folder)


class SGLangEngine(HTTPEngine):
    name = "sglang"

    def generate(self, contexts, max_new_tokens):
        url = self.url + "/generate"
        expected = "a list with one {\"meta_info\": {\"output_token_logprobs\": [[logprob, id, text], ...]}} a prompt"
        # top_p 1 and top_k -1: the sampling distribution is softmax(logits / T), the one SGLang's logprobs come from
        body = {"input_ids": contexts, "return_logprob": True,
                "sampling_params": {"temperature": self.temperature, "max_new_tokens": max_new_tokens, "top_p": 1.0,
                                    "top_k": -1, "stop_token_ids": [self.tokenizer.eos_token_id]}}
        answers = post_json(url, body, self.timeout, expected)
        if not isinstance(answers, list) or len(answers) != len(contexts):
            raise RolloutEngineError(f"rollout engine {url} answered {str(answers)[:200]}; expected {expected}")
        samples = []
        for answer in answers:
            triples = (answer.get("meta_info") or {}).get("output_token_logprobs") if isinstance(answer, dict) else None
            if not isinstance(triples, list) or not all(isinstance(t, list) and len(t) >= 2 for t in triples):
                raise RolloutEngineError(f"rollout engine {url} answered {str(answer)[:200]}; expected {expected}")
            samples.append(checked_sample([t[1] for t in triples], [t[0] for t in triples], url, expected))
        return samples

    def load(self, folder, step):
        url = self.url + "/update_weights_from_disk"
        answer = post_json(url, {"model_path": folder, "weight_version": f"step_{step}"}, self.timeout,
                           "{\"success\": true, ...}")
        if not isinstance(answer, dict) or answer.get("success") is not True:
            raise RolloutEngineError(f"rollout engine {url} did not load {folder}: {str(answer)[:300]}")


class VLLMEngine(HTTPEngine):
    name = "vllm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        url = self.url + "/v1/models"
        models = read_json(urllib.request.Request(url), url, self.timeout, "{\"data\": [{\"id\": MODEL}]}")
        try:
            self.model_name = models["data"][0]["id"]  # the served model's name, which completions must name
        except (KeyError, IndexError, TypeError):
            raise RolloutEngineError(f"rollout engine {url} answered {str(models)[:200]}; expected "
                                     "{\"data\": [{\"id\": MODEL}]}") from None

    def generate(self, contexts, max_new_tokens):
        url = self.url + "/v1/completions"
        expected = "{\"choices\": [{\"index\", \"logprobs\": {\"tokens\": [\"token_id:N\", ...], \"token_logprobs\"}}]}"
        body = {"model": self.model_name, "prompt": contexts, "max_tokens": max_new_tokens,
                "temperature": self.temperature, "top_p": 1.0, "top_k": -1, "logprobs": 0,
                "return_tokens_as_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id]}
        answer = post_json(url, body, self.timeout, expected)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(contexts):
            raise RolloutEngineError(f"rollout engine {url} answered {str(answer)[:200]}; expected {expected}")
        samples = [None] * len(contexts)
        for choice in choices:
            try:
                logprobs = choice["logprobs"]
                ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
                samples[choice["index"]] = checked_sample(ids, logprobs["token_logprobs"], url, expected)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                raise RolloutEngineError(f"rollout engine {url} answered {str(choice)[:200]}; expected "
                                         f"{expected}") from None
        if None in samples:
            raise RolloutEngineError(f"rollout engine {url} answered choices {[c.get('index') for c in choices]}; "
                                     f"expected one for each of the {len(contexts)} prompts")
        return samples

    def load(self, folder, step):
        url = self.url + "/collective_rpc"
        post_json(url, {"method": "reload_weights", "kwargs": {"weights_path": folder}}, self.timeout,
                  "{\"results\": [...]}")
        post_json(self.url + "/reset_prefix_cache", {}, self.timeout, "{}")  # cached prefixes hold old keys


def make_engine(args, policy, tokenizer, tokenizer_dir, logprobs=True):
    """The engine --rollout_engine names: the in-process one samples with `policy` itself (and returns no log-probs
    when logprobs=False; a server engine always returns them)."""
    if args.rollout_engine == "torch":
        return TorchEngine(policy, tokenizer, args.temperature, logprobs=logprobs)
    engine = SGLangEngine if args.rollout_engine == "sglang" else VLLMEngine
    sync_dir = args.sync_dir or os.path.join(args.save_dir, "rollout_weights")
    return engine(args.rollout_url, tokenizer, args.temperature, tokenizer_dir, sync_dir, args.sync_interval,
                  args.rollout_timeout, policy.config)
