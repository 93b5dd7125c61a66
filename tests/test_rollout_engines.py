"""Rollout engines over real HTTP (trainer/rl/engines.py): the SGLang-style and vLLM-style clients against this
project's server (scripts/serve_openai_api.py answers /generate, /v1/completions, /update_weights_from_disk and
/collective_rpc), weight syncs, clear errors for servers that are down, slow or answer garbage, and the RL stages
trained on a server engine. (SGLang and vLLM themselves need a GPU; their protocols are followed from their source.)"""
import http.server
import json
import socket
import threading
import time
import urllib.request

import pytest
import torch

from common.tokenizer import load_tokenizer
from conftest import PROJECT_TOKENIZER, free_port, start_server, talkative_weight
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from test_train import metrics, run_script
from trainer.rl.engines import RolloutEngineError, SGLangEngine, VLLMEngine

TOKENIZER = load_tokenizer()
PROMPTS = [TOKENIZER("你好，请介绍一下你自己。").input_ids, TOKENIZER("1+1=").input_ids]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def weight(root):
    return talkative_weight(root / "start_64.pth")


@pytest.fixture(scope="module")
def server(root, weight):
    process, url = start_server(root, "--load_from", str(weight), "--max_seq_len", "4096",
                                "--weight_update_root", str(root / "sync"))
    yield url
    process.terminate()
    process.wait(timeout=30)


def local_model(weight):
    state = torch.load(weight, weights_only=True)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def engine(kind, url, root, temperature=0.8, sync_interval=1, timeout=60):
    cls = SGLangEngine if kind == "sglang" else VLLMEngine
    return cls(url, TOKENIZER, temperature, PROJECT_TOKENIZER, str(root / "sync"), sync_interval, timeout,
               MiniMindConfig(hidden_size=64, num_hidden_layers=2))


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sampling_logprobs(model, prompt, ids, temperature):
    """Each sampled token's log-prob under softmax(logits / T) of `model`, by one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_engines_sample_token_ids_with_the_sampling_log_probs(server, root, weight, kind):
    samples = engine(kind, server, root).generate(PROMPTS, max_new_tokens=12)
    model = local_model(weight)
    assert len(samples) == 2
    for prompt, (ids, logps) in zip(PROMPTS, samples):
        assert 1 <= len(ids) == len(logps) <= 12
        assert TOKENIZER.eos_token_id not in ids[:-1]  # a sample ends at its first <|im_end|>, kept
        # the log-probs are those of the distribution sampled from (temperature 0.8), not the raw model's
        assert torch.allclose(torch.tensor(logps), sampling_logprobs(model, prompt, ids, 0.8), atol=2e-3)


def test_generate_and_completions_answer_in_the_engines_shapes(server):
    status, one = post(server + "/generate", {"input_ids": PROMPTS[0], "return_logprob": True,
                                              "sampling_params": {"temperature": 0, "max_new_tokens": 5}})
    assert status == 200 and set(one) == {"text", "output_ids", "meta_info"}  # one prompt: one object
    meta = one["meta_info"]
    assert meta["completion_tokens"] == len(one["output_ids"]) and meta["prompt_tokens"] == len(PROMPTS[0])
    assert [t[1] for t in meta["output_token_logprobs"]] == one["output_ids"]
    assert meta["finish_reason"] in ({"type": "length", "length": 5}, {"type": "stop", "matched": one["output_ids"][-1]})
    status, batch = post(server + "/generate", {"input_ids": PROMPTS, "sampling_params": {"temperature": 0,
                                                                                          "max_new_tokens": 5}})
    assert status == 200 and isinstance(batch, list) and batch[0]["output_ids"] == one["output_ids"]  # greedy
    assert "output_token_logprobs" not in batch[0]["meta_info"]
    status, error = post(server + "/generate", {"input_ids": PROMPTS, "sampling_params": {"temprature": 1}})
    assert status == 400 and "temprature" in error["error"]["message"]

    status, done = post(server + "/v1/completions", {"prompt": "1+1=", "max_tokens": 5, "temperature": 0,
                                                     "logprobs": 0, "return_token_ids": True})
    assert status == 200 and done["object"] == "text_completion"
    [choice] = done["choices"]
    assert choice["prompt_token_ids"] == PROMPTS[1] and len(choice["token_ids"]) == done["usage"]["completion_tokens"]
    assert choice["text"] == TOKENIZER.decode(choice["token_ids"], skip_special_tokens=True)
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"])
    status, error = post(server + "/v1/completions", {"prompt": [PROMPTS[1] + [7000]], "max_tokens": 5})
    assert status == 400 and "7000" in error["error"]["message"]


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_a_sync_makes_the_server_sample_with_the_new_weights(server, root, kind):
    """The engine writes the policy as a Llama folder and the server loads it (SGLang's /update_weights_from_disk,
    vLLM's /collective_rpc reload_weights): greedy answers then follow the new weights, not the old."""
    torch.manual_seed(7)
    policy = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() == 2:
                p.mul_(20)
    client = engine(kind, server, root, temperature=1e-7)  # SGLang: under 1e-6 is greedy; vLLM: nearly so
    client.dtype = torch.float32
    client.maybe_sync(policy, 0)
    assert client.staleness(0) == 0 and client.staleness(3) == 3
    assert sorted(p.name for p in (root / "sync").iterdir()) == ["step_0"]  # earlier folders removed
    status, answer = post(server + "/generate", {"input_ids": PROMPTS[0],
                                                 "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    with torch.no_grad():
        expected = policy.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=TOKENIZER.eos_token_id)[0, len(PROMPTS[0]):].tolist()
    assert answer["output_ids"] == expected
    client.maybe_sync(policy, 1)  # the next interval's weights replace the folder
    assert sorted(p.name for p in (root / "sync").iterdir()) == ["step_1"]


def test_a_sync_folder_is_the_architecture_engines_load_natively(tmp_path):
    """minimind-3 goes to the engine as a Qwen3 folder that gives the policy's logits; a MoE MiniMind2, which has no
    such architecture, is refused when the engine is made, with the reason."""
    from model.qwen3_format import is_qwen3_folder, load_qwen3_folder
    torch.manual_seed(0)
    policy = MiniMindForCausalLM(MiniMindConfig(generation="minimind-3", hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    client = SGLangEngine("http://127.0.0.1:1", TOKENIZER, 1.0, PROJECT_TOKENIZER, str(tmp_path), 1, 5, policy.config)
    client.dtype = torch.float32
    folder = client.save(policy, 3)
    assert folder.endswith("step_3") and is_qwen3_folder(folder)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.allclose(load_qwen3_folder(folder).eval()(ids).logits, policy(ids).logits, atol=1e-5)
    with pytest.raises(SystemExit, match="MoE MiniMind has no Llama equivalent"):
        SGLangEngine("http://127.0.0.1:1", TOKENIZER, 1.0, PROJECT_TOKENIZER, str(tmp_path), 1, 5,
                     MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=True))


def test_weights_load_only_from_under_the_allowed_root(server, root, tmp_path):
    status, answer = post(server + "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert status == 403 and answer["success"] is False and "--weight_update_root" in answer["message"]
    (root / "sync" / "broken").mkdir(parents=True, exist_ok=True)
    status, answer = post(server + "/update_weights_from_disk", {"model_path": str(root / "sync" / "broken")})
    assert status == 400 and "no config.json" in answer["message"]
    status, answer = post(server + "/collective_rpc", {"method": "reload_weights",
                                                       "kwargs": {"weights_path": str(root / "sync" / "..")}})
    assert status == 403  # .. out of the root is refused too


class Garbage(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>not an engine</html>" if self.path == "/generate" else json.dumps({"choices": "no"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # vLLM's /v1/models
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_is_down_slow_or_answers_garbage_is_named_with_what_was_expected(root):
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutEngineError, match=f"cannot reach the rollout engine at {down}/generate"):
        engine("sglang", down, root).generate(PROMPTS, 4)

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    slow = f"http://127.0.0.1:{silent.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=f"{slow}/generate did not answer within 1 s"):
        engine("sglang", slow, root, timeout=1).generate(PROMPTS, 4)
    assert time.perf_counter() - start < 10
    silent.close()

    garbage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=garbage.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{garbage.server_address[1]}"
    with pytest.raises(RolloutEngineError, match=f"{url}/generate answered something that is not JSON"):
        engine("sglang", url, root).generate(PROMPTS, 4)
    with pytest.raises(RolloutEngineError, match="expected .*token_logprobs"):
        engine("vllm", url, root).generate(PROMPTS, 4)
    garbage.shutdown()


RL_ARGS = ["--max_gen_len", "8", "--batch_size", "2", "--accumulation_steps", "1", "--reasoning", "0",
           "--from_weight", "start", "--dtype", "float32", "--learning_rate", "1e-3",
           "--tokenizer_dir", PROJECT_TOKENIZER]  # the talkative random weight reads no tokenizer: named, it loads


def test_grpo_ppo_and_spo_train_on_a_server_engine_and_log_its_staleness(server, root, weight, tmp_path):
    """--rollout_engine sglang with --sync_interval 2: the weights go to the server before step 1 and after step 2,
    so steps 1-3 sample with weights 0, 1, 0 steps old; the ratio is taken against the server's log-probs."""
    for script, name, extra in (("train_grpo.py", "grpo_64", ["--num_generations", "2"]),
                                ("train_ppo.py", "ppo_actor_64", []), ("train_spo.py", "spo_64", [])):
        out = tmp_path / script
        (out / "out").mkdir(parents=True)
        (out / "out" / "start_64.pth").write_bytes(weight.read_bytes())
        run_script(script, *RL_ARGS, *extra, "--max_steps", "3", "--rollout_engine", "sglang", "--rollout_url",
                   server, "--sync_interval", "2", "--sync_dir", str(root / "sync"), tmp=out)
        rows = metrics(out, f"{name}_metrics.jsonl")
        assert [r["staleness"] for r in rows] == [0, 1, 0] and any(r["grad_norm"] > 0 for r in rows)
        if script == "train_grpo.py":  # bf16 weights on the server: its log-probs close to the policy's, not equal
            assert abs(rows[0]["ratio"] - 1) < 0.1 and rows[0]["ratio"] != 1


def test_the_agent_stage_trains_on_a_vllm_style_server(server, root, weight, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "start_64.pth").write_bytes(weight.read_bytes())
    run_script("train_agent.py", "--from_weight", "start", "--tokenizer_dir", PROJECT_TOKENIZER, "--dtype", "float32",
               "--batch_size", "1",
               "--num_generations", "2", "--max_turns", "2", "--max_gen_len", "12", "--max_steps", "2",
               "--rollout_engine", "vllm", "--rollout_url", server, "--sync_dir", str(root / "sync"),
               # the sync rounds the talkative random weight to bf16, which moves its log-probs more than a trained
               # model's: right after a sync its mean ratio is about 1.05 (exactly 1 with an fp32 sync)
               "--ratio_check", "0.2", tmp=tmp_path)
    rows = metrics(tmp_path, "agent_64_metrics.jsonl")
    assert [r["staleness"] for r in rows] == [0, 0] and all(r["updates"] == 1 for r in rows)


def test_a_server_engine_needs_its_url(tmp_path):
    result = run_script("train_grpo.py", *RL_ARGS, "--rollout_engine", "sglang", tmp=tmp_path, check=False)
    assert result.returncode == 2 and "--rollout_url" in result.stderr


def test_neutral_sampling_settings_are_accepted_and_per_prompt_settings_kept(server):
    """The trainer sends every sampling setting, the penalties and min_p at their neutral values, so that an engine's
    generation_config.json cannot change its sampling: accepted on both endpoints, other values refused naming the
    field (this server has no penalties). SGLang's sampling_params may be a list: each prompt its own settings."""
    neutral = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
    params = {"temperature": 0, "max_new_tokens": 5, "top_p": 1.0, "top_k": -1,
              "stop_token_ids": [TOKENIZER.eos_token_id], "sampling_seed": 1, **neutral}
    status, one = post(server + "/generate", {"input_ids": PROMPTS[0], "sampling_params": params})
    assert status == 200
    status, done = post(server + "/v1/completions", {"prompt": [PROMPTS[0]], "max_tokens": 5, "temperature": 0,
                                                     "top_p": 1.0, "top_k": -1, "seed": 1, "return_token_ids": True,
                                                     "stop_token_ids": [TOKENIZER.eos_token_id], **neutral})
    assert status == 200 and done["choices"][0]["token_ids"] == one["output_ids"]  # greedy on both
    for name, value in [("repetition_penalty", 1.1), ("presence_penalty", 0.5), ("frequency_penalty", -0.5),
                        ("min_p", 0.05), ("min_p", True)]:
        status, error = post(server + "/generate", {"input_ids": PROMPTS[0],
                                                    "sampling_params": {**params, name: value}})
        assert status == 400 and error["error"]["param"] == f"sampling_params.{name}"
        assert "not supported here" in error["error"]["message"]
        status, error = post(server + "/v1/completions", {"prompt": "1+1=", "max_tokens": 5, name: value})
        assert status == 400 and error["error"]["param"] == name

    # per prompt: the first as above, the second greedy for 3 tokens - the same answers as each alone
    short = {**params, "max_new_tokens": 3}
    status, alone = post(server + "/generate", {"input_ids": PROMPTS[1], "sampling_params": short})
    status, batch = post(server + "/generate", {"input_ids": PROMPTS, "sampling_params": [params, short]})
    assert status == 200 and [b["output_ids"] for b in batch] == [one["output_ids"], alone["output_ids"]]
    status, error = post(server + "/generate", {"input_ids": PROMPTS, "sampling_params": [params]})
    assert status == 400 and error["error"]["param"] == "sampling_params"
    status, error = post(server + "/generate", {"input_ids": PROMPTS, "sampling_params": [params, {"top_k": 1.5}]})
    assert status == 400 and error["error"]["param"] == "sampling_params[1].top_k"


def test_a_weight_update_never_runs_code_from_the_folder(server, root, tmp_path):
    """A folder whose config.json names a module of its own (auto_map) is refused, the module never imported: weight
    updates load the plain Llama / Qwen3 folders the engines write, and anyone who can write a folder under the root
    must not get to run code in the server."""
    marker = tmp_path / "imported"
    folder = root / "sync" / "remote_code"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "minimind_remote", "auto_map": {
        "AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}}))
    (folder / "remote.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    for url, body in [("/update_weights_from_disk", {"model_path": str(folder)}),
                      ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})]:
        status, answer = post(server + url, body)
        assert not marker.exists(), f"{url} imported the folder's module"
        message = answer["message"] if "message" in answer else answer["error"]["message"]
        assert status == 400 and "auto_map" in message, answer


def test_a_server_started_with_an_api_key_serves_the_trainer_that_sends_it(weight, tmp_path):
    """A server with --api_key guards every endpoint, the reload ones included: the trainer without the key gets a 401
    that names --rollout_api_key; with it, it syncs and samples."""
    process, url = start_server(tmp_path, "--load_from", str(weight), "--max_seq_len", "512",
                                "--weight_update_root", str(tmp_path / "sync"), "--api_key", "s3cret")
    try:
        with pytest.raises(RolloutEngineError, match="HTTP 401 .*--rollout_api_key"):
            engine("sglang", url, tmp_path).generate(PROMPTS, 4)
        keyed = SGLangEngine(url, TOKENIZER, 0.8, PROJECT_TOKENIZER, str(tmp_path / "sync"), 1, 60,
                             MiniMindConfig(hidden_size=64, num_hidden_layers=2), api_key="s3cret")
        keyed.maybe_sync(local_model(weight), 0)
        samples = keyed.generate(PROMPTS, 4)
        assert len(samples) == 2 and all(ids and len(ids) == len(logps) for ids, logps in samples)
    finally:
        process.terminate()
        process.wait(timeout=30)
