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
- vllm:   a vLLM server (>= 0.10.2, started with --logprobs-mode processed_logprobs), OpenAI-compatible
          /v1/completions with token-id prompts, logprobs 0 and return_tokens_as_token_ids; the same folder through its
          development control plane (VLLM_SERVER_DEV_MODE=1), POST /collective_rpc {"method": "reload_weights",
          "kwargs": {"weights_path": ...}} (vLLM >= 0.16; older releases reload the folder they were started with,
          which the trainer then writes into), then /reset_prefix_cache.
The importance ratio is right only if the log-probs are log softmax(logits / T) over the whole vocabulary, the
distribution the engine sampled from: every other sampling setting goes out at its neutral value (NEUTRAL_SAMPLING),
so a server's defaults cannot switch on penalties, min-p, top-k or top-p, and the trainers stop (--ratio_check) when
right after a sync the ratio is not 1. Each prompt gets a seed from the trainer's RNG, so a run can be repeated.
Between syncs the engine samples with older weights; the trainers take the importance ratio against the log-probs
the engine returns, so PPO-clip / CISPO correct for it, and log the staleness. An engine that is down, slow or
answers something else stops the run with the URL and what was expected, after --rollout_timeout seconds at most;
a refused or dropped connection and HTTP 429 / 502 / 503 / 504 are retried --rollout_retries times first, and an
aborted request is an error, never a cut-off answer.
"""
import concurrent.futures
import json
import math
import os
import random
import re
import shutil
import socket
import time
import urllib.error
import urllib.request

import torch

from model.hf_export import engine_format, save_for_engines


def left_pad(rows, pad_id, device):
    """Rows of token ids as left-padded ids and attention mask, so every row's continuation starts at one column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class RolloutEngineError(RuntimeError):
    pass


class TorchEngine:
    name = "torch"

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
        # The processors a model folder's generation_config.json could switch on are set neutral here: explicit
        # arguments outrank it (GenerationMixin._prepare_generation_config fills only what was not given). min_p
        # makes a processor whenever it is not None, so 0.0 is passed only to override a configured one.
        min_p = 0.0 if getattr(model.generation_config, "min_p", None) is not None else None
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=self.min_new_tokens, do_sample=True, temperature=self.temperature,
                             top_k=0, top_p=1.0, min_p=min_p, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                             repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=tokenizer.pad_token_id,
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


TRANSIENT_HTTP = (429, 502, 503, 504)  # busy, or a proxy / load balancer in front of a restarting server
API_KEY_ENV = "MINIMIND_API_KEY"  # what this project's server reads its key from
NO_LOGPROB = -9999.0  # an engine's log-prob of -inf (vLLM's own stand-in for it; JSON cannot carry -inf)


class TransientEngineError(RolloutEngineError):
    """A failure that may pass (connection refused or dropped, HTTP 429 / 502 / 503 / 504): worth a retry."""


def post_json(url, body, timeout, expected, api_key=None, retries=0, backoff=1.0):
    """POST body as JSON; the parsed answer. A server that cannot be reached, does not answer within timeout
    seconds, answers an HTTP error or something that is not JSON raises RolloutEngineError naming the URL and
    `expected` (what the answer should have been); transient failures are retried `retries` times first, after
    backoff, 2 backoff, 4 backoff ... seconds. api_key goes as 'Authorization: Bearer KEY'."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    return read_json(request, url, timeout, expected, retries, backoff)


def read_json(request, url, timeout, expected, retries=0, backoff=1.0):
    for attempt in range(retries + 1):
        try:
            return read_json_once(request, url, timeout, expected)
        except TransientEngineError as e:
            if attempt == retries:
                raise RolloutEngineError(f"{e}{f' (tried {retries + 1} times)' if retries else ''}") from None
            time.sleep(backoff * 2 ** attempt)


def read_json_once(request, url, timeout, expected):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode("utf-8", "replace")
        error = TransientEngineError if e.code in TRANSIENT_HTTP else RolloutEngineError
        hint = " (the server wants an API key: --rollout_api_key or $MINIMIND_API_KEY)" if e.code == 401 else ""
        raise error(f"rollout engine {url} answered HTTP {e.code}{hint}: {detail}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError) as e:  # a timeout comes either bare or wrapped
        if isinstance(getattr(e, "reason", e), (socket.timeout, TimeoutError)):  # not retried: it waited already
            raise RolloutEngineError(f"rollout engine {url} did not answer within {timeout:g} s "
                                     "(--rollout_timeout)") from None
        raise TransientEngineError(f"cannot reach the rollout engine at {url} ({e.reason}): is the server running "
                                   "there? (see the README's rollout engine runbook)") from None
    except ConnectionError as e:
        raise TransientEngineError(f"rollout engine {url} dropped the connection ({e})") from None
    if not raw.strip():
        return {}  # vLLM's control endpoints answer 200 with an empty body
    try:
        return json.loads(raw)
    except ValueError:
        raise RolloutEngineError(f"rollout engine {url} answered something that is not JSON ({raw[:200]!r}); "
                                 f"expected {expected}") from None


def checked_sample(ids, logps, url, expected):
    """(ids, logps) once they are lists of ints and numbers of one length; else RolloutEngineError. A log-prob
    the engine could not give as a number (null, -inf, nan: a token its processed distribution ruled out) becomes
    NO_LOGPROB, as vLLM writes it; the trainers' ratios clamp it (losses.importance_ratio)."""
    if (not isinstance(ids, list) or not isinstance(logps, list) or len(ids) != len(logps) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
            or not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in logps)):
        raise RolloutEngineError(f"rollout engine {url} answered a sample without matching token ids and log-probs; "
                                 f"expected {expected}")
    return ids, [float(x) if x is not None and math.isfinite(x) and x > NO_LOGPROB else NO_LOGPROB for x in logps]


def check_sampler_ratio(engine, steps_done, metrics, tolerance):
    """Stop when, right after a sync (the sampler holding the policy's weights), the mean importance ratio
    pi / pi_sample over the sampled tokens (metrics["ratio"], the step's) is not 1 within `tolerance`: the engine's
    log-probs are then not the log-probs of the distribution it sampled from (penalties, top-k / top-p, raw logits
    before the temperature), and every ratio the objective takes would be wrong. Nothing to check while the engine's
    weights are stale, or when it returns no log-probs (in-process GRPO / PPO / SPO take pi_old from a forward)."""
    if not tolerance or engine.staleness(steps_done) or not engine.logprobs:
        return
    mean_ratio = float(metrics["ratio"])  # a host read, once per sync
    if abs(mean_ratio - 1) > tolerance:
        raise SystemExit(
            f"right after a weight sync the mean ratio pi / pi_sample is {mean_ratio:.4f}, not 1 within "
            f"{tolerance:g} (--ratio_check): the rollout engine ({engine.name}) returns log-probs of another "
            "distribution than the one it sampled from. "
            + ENGINE_SETTINGS.get(engine.name, "Check the model's generation settings."))


ENGINE_SETTINGS = {
    "vllm": "Start vLLM with --logprobs-mode processed_logprobs (vLLM >= 0.10.2); its default returns the raw "
            "logits' log-probs, before the temperature.",
    "sglang": "Start SGLang without SGLANG_RETURN_ORIGINAL_LOGPROB set: with it the log-probs are the raw "
              "logits', before the temperature.",
    "torch": "The in-process engine should agree exactly: a model generation_config.json with sampling processors "
             "the engine does not override?",
}


class HTTPEngine:
    """What the two server engines share: requests (API key, retries), the weight folders and the sync cadence.
    The folder goes to sync_dir/step_N (written whole, then renamed into place), which the server must be able to
    read: the same machine or a shared filesystem. The previous folder is removed only once the server answered
    that it loaded the new one, so a server that restarts or loads lazily still finds the weights it holds."""
    logprobs = True  # a server always returns the log-probs it sampled with

    def __init__(self, url, tokenizer, temperature, tokenizer_dir, sync_dir, sync_interval, timeout, config,
                 api_key=None, retries=0, backoff=1.0):
        try:
            engine_format(config)
        except ValueError as e:
            raise SystemExit(f"--rollout_engine {self.name}: {e}")
        self.url, self.tokenizer, self.temperature = url.rstrip("/"), tokenizer, temperature
        self.tokenizer_dir, self.sync_dir, self.sync_interval, self.timeout = (tokenizer_dir, sync_dir, sync_interval,
                                                                               timeout)
        self.api_key, self.retries, self.backoff = api_key, retries, backoff
        self.synced_step = None  # the step whose weights the engine holds; None before the first sync
        self.dtype = torch.bfloat16  # what GPU engines serve in

    def post(self, path, body, expected):
        return post_json(self.url + path, body, self.timeout, expected, self.api_key, self.retries, self.backoff)

    def get(self, path, expected, retries=None):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return read_json(urllib.request.Request(self.url + path, headers=headers), self.url + path, self.timeout,
                         expected, self.retries if retries is None else retries, self.backoff)

    @staticmethod
    def seeds(n):
        """A seed for each request, drawn from the global RNG (which the trainers seed and resume), so that a run
        on a server engine can be repeated; one per prompt, since the G copies of a prompt must differ."""
        return [random.getrandbits(31) for _ in range(n)]

    def maybe_sync(self, model, steps_done):
        """Send the policy's weights after `steps_done` optimizer steps: at the start (the engine may have been
        started with other weights; on a resume, with the last saved ones) and every sync_interval steps. Under
        torchrun the first process writes and sends them while the others wait."""
        if self.synced_step is not None and (steps_done % self.sync_interval or steps_done == self.synced_step):
            return
        if int(os.environ.get("RANK", 0)) == 0:
            folder = self.save(model, steps_done)
            self.load(folder, steps_done)
            self.remove_older(folder)  # only now: the engine answered that it holds the new weights
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.synced_step = steps_done

    def staleness(self, steps_done):
        """Optimizer steps the sampling weights lag behind the policy (0 right after a sync)."""
        return steps_done - self.synced_step

    def remove_older(self, folder):
        for old in os.listdir(self.sync_dir):
            if old.startswith("step_") and old != os.path.basename(folder):
                shutil.rmtree(os.path.join(self.sync_dir, old), ignore_errors=True)

    def save(self, model, step):
        return self.write(model, os.path.join(self.sync_dir, f"step_{step}"))

    def write(self, model, folder, keep_old_as=None):
        """The policy as an engine folder at `folder`: written whole beside it, then renamed into place; what was
        there is removed, or moved to keep_old_as."""
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_for_engines(model, partial, self.tokenizer_dir, self.dtype)
        shutil.rmtree(keep_old_as or folder, ignore_errors=True)
        if keep_old_as:
            os.replace(folder, keep_old_as)
        os.replace(partial, folder)
        return os.path.abspath(folder)


def release(text):
    """(major, minor, patch) of a version string such as "0.16.0" or "0.11.1rc2.dev3+g1234"; None if none."""
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(x or 0) for x in match.groups()) if match else None


def dotted(version):
    return ".".join(map(str, version))


# Neutral values of every setting that could change the distribution the engine samples from and returns log-probs
# of: sent explicitly, so that a server's defaults (vLLM takes them from the model's generation_config.json) cannot
# switch on penalties, min-p, top-k or top-p
NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}


class SGLangEngine(HTTPEngine):
    """SGLang's native /generate. Its log-probs are log softmax(logits / T) unless the server runs with
    SGLANG_RETURN_ORIGINAL_LOGPROB (RETURN_ORIGINAL_LOGPROB in 0.5.2 - 0.5.3); a per-prompt sampling_seed exists
    from 0.5.3 (older servers refuse the field) and takes effect with --enable-deterministic-inference."""
    name = "sglang"
    SEED_SINCE = (0, 5, 3)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:  # SGLang's server info names its release (this project's server has none: it takes every field)
            info = self.get("/get_server_info", "{\"version\": ...}", retries=0)
        except RolloutEngineError:
            info = {}
        self.version = release(info.get("version")) if isinstance(info, dict) else None
        self.send_seed = self.version is None or self.version >= self.SEED_SINCE

    def generate(self, contexts, max_new_tokens):
        url = self.url + "/generate"
        expected = "a list with one {\"meta_info\": {\"output_token_logprobs\": [[logprob, id, text], ...]}} a prompt"
        params = {"temperature": self.temperature, "max_new_tokens": max_new_tokens, **NEUTRAL_SAMPLING,
                  "stop_token_ids": [self.tokenizer.eos_token_id]}
        # one settings object per prompt (SGLang takes a list), each with its own seed: the G copies must differ
        body = {"input_ids": contexts, "return_logprob": True,
                "sampling_params": [dict(params, sampling_seed=seed) for seed in self.seeds(len(contexts))]
                if self.send_seed else params}
        answers = self.post("/generate", body, expected)
        if not isinstance(answers, list) or len(answers) != len(contexts):
            raise RolloutEngineError(f"rollout engine {url} answered {str(answers)[:200]}; expected {expected}")
        samples = []
        for answer in answers:
            meta = (answer.get("meta_info") or {}) if isinstance(answer, dict) else {}
            finish = meta.get("finish_reason") if isinstance(meta, dict) else None
            if isinstance(finish, dict) and finish.get("type") == "abort":  # not a cut-off turn: the server gave up
                raise RolloutEngineError(f"rollout engine {url} aborted a request: {finish.get('message')}")
            triples = meta.get("output_token_logprobs") if isinstance(meta, dict) else None
            if not isinstance(triples, list) or not all(isinstance(t, list) and len(t) >= 2 for t in triples):
                raise RolloutEngineError(f"rollout engine {url} answered {str(answer)[:200]}; expected {expected}")
            samples.append(checked_sample([t[1] for t in triples], [t[0] for t in triples], url, expected))
        return samples

    def load(self, folder, step):
        url = self.url + "/update_weights_from_disk"
        answer = self.post("/update_weights_from_disk", {"model_path": folder, "weight_version": f"step_{step}"},
                           "{\"success\": true, ...}")
        if not isinstance(answer, dict) or answer.get("success") is not True:
            raise RolloutEngineError(f"rollout engine {url} did not load {folder}: {str(answer)[:300]}")


class VLLMEngine(HTTPEngine):
    """vLLM's OpenAI-compatible /v1/completions with token-id prompts. Needs vLLM >= 0.10.2 started with
    --logprobs-mode processed_logprobs (from 0.10.2 the processed log-probs include the temperature; the default,
    raw_logprobs, is the logits' log-softmax before it) and VLLM_SERVER_DEV_MODE=1 (for /collective_rpc).
    Weight reload: from 0.16.0 reload_weights takes weights_path; 0.10.2 - 0.15.x reload only from the folder the
    server was started with, so with those the trainer writes each sync into that folder (GET /v1/models' root)
    and calls reload_weights without arguments."""
    name = "vllm"
    MINIMUM = (0, 10, 2)
    RELOAD_FROM_PATH_SINCE = (0, 16, 0)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models = self.get("/v1/models", "{\"data\": [{\"id\": MODEL}]}")
        try:
            self.model_name = models["data"][0]["id"]  # the served model's name, which completions must name
        except (KeyError, IndexError, TypeError):
            raise RolloutEngineError(f"rollout engine {self.url}/v1/models answered {str(models)[:200]}; expected "
                                     "{\"data\": [{\"id\": MODEL}]}") from None
        try:
            version = self.get("/version", "{\"version\": \"0.16.0\"}", retries=0)
        except RolloutEngineError:  # not vLLM (this project's server speaks the current protocol)
            version = {}
        self.version = release(version.get("version")) if isinstance(version, dict) else None
        if self.version is not None and self.version < self.MINIMUM:
            raise SystemExit(f"--rollout_engine vllm: the server at {self.url} runs vLLM {dotted(self.version)}; the "
                             f"trainer needs vLLM >= {dotted(self.MINIMUM)} (--logprobs-mode processed_logprobs with "
                             "the temperature applied, and /collective_rpc)")
        self.served_folder = None  # vLLM < 0.16: the folder the server reloads from
        if self.version is not None and self.version < self.RELOAD_FROM_PATH_SINCE:
            root = models["data"][0].get("root")
            if not isinstance(root, str) or not os.path.isfile(os.path.join(root, "config.json")):
                raise SystemExit(f"--rollout_engine vllm: vLLM {dotted(self.version)} reloads weights only from the "
                                 f"folder it was started with, and {root!r} is not a model folder this machine can "
                                 "write to. Start vLLM on a folder here (see the README's vLLM runbook), or use "
                                 f"vLLM >= {dotted(self.RELOAD_FROM_PATH_SINCE)}.")
            self.served_folder = os.path.abspath(root)

    def generate(self, contexts, max_new_tokens):
        """One request per prompt, sent together: vLLM gives every prompt of one request the same seed, and the G
        copies of a prompt must differ."""
        url = self.url + "/v1/completions"
        expected = "{\"choices\": [{\"index\", \"logprobs\": {\"tokens\": [\"token_id:N\", ...], \"token_logprobs\"}}]}"
        bodies = [{"model": self.model_name, "prompt": [context], "max_tokens": max_new_tokens,
                   "temperature": self.temperature, **NEUTRAL_SAMPLING, "seed": seed, "logprobs": 0,
                   "return_tokens_as_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id]}
                  for context, seed in zip(contexts, self.seeds(len(contexts)))]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(bodies))) as pool:
            answers = list(pool.map(lambda body: self.post("/v1/completions", body, expected), bodies))
        samples = []
        for answer in answers:
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != 1:
                raise RolloutEngineError(f"rollout engine {url} answered {str(answer)[:200]}; expected {expected}")
            choice = choices[0]
            if isinstance(choice, dict) and choice.get("finish_reason") in ("abort", "error"):
                raise RolloutEngineError(f"rollout engine {url} ended a request with finish_reason "
                                         f"{choice['finish_reason']!r}: the server gave up on it")
            try:
                logprobs = choice["logprobs"]
                ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
                samples.append(checked_sample(ids, logprobs["token_logprobs"], url, expected))
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                raise RolloutEngineError(f"rollout engine {url} answered {str(choice)[:200]}; expected "
                                         f"{expected}") from None
        return samples

    def save(self, model, step):
        if self.served_folder is None:
            return super().save(model, step)
        # vLLM < 0.16: the new weights take the served folder's place (the old ones kept aside until the reload)
        return self.write(model, self.served_folder, keep_old_as=self.served_folder + ".previous")

    def load(self, folder, step):
        kwargs = {} if self.served_folder is not None else {"weights_path": folder}
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": kwargs}, "{\"results\": [...]}")
        self.post("/reset_prefix_cache", {}, "{}")  # cached prefixes hold old keys

    def remove_older(self, folder):
        if self.served_folder is None:
            return super().remove_older(folder)
        shutil.rmtree(self.served_folder + ".previous", ignore_errors=True)


def make_engine(args, policy, tokenizer, tokenizer_dir, logprobs=True):
    """The engine --rollout_engine names: the in-process one samples with `policy` itself (and returns no log-probs
    when logprobs=False; a server engine always returns them)."""
    if args.rollout_engine == "torch":
        return TorchEngine(policy, tokenizer, args.temperature, logprobs=logprobs)
    engine = SGLangEngine if args.rollout_engine == "sglang" else VLLMEngine
    sync_dir = args.sync_dir or os.path.join(args.save_dir, "rollout_weights")
    return engine(args.rollout_url, tokenizer, args.temperature, tokenizer_dir, sync_dir, args.sync_interval,
                  args.rollout_timeout, policy.config, api_key=args.rollout_api_key or os.environ.get(API_KEY_ENV),
                  retries=args.rollout_retries)
