"""What the rollout engines send and how they read answers (trainer/rl/engines.py), against a recording stand-in
server: every sampling setting at its neutral value, a seed per prompt, the API key, retries of transient failures,
aborted requests as errors, -inf log-probs, vLLM's release checks and old-release reload, the sync folder kept until
the engine loaded its successor, and the sampler-ratio check stopping a run whose engine returns other log-probs."""
import http.server
import json
import os
import threading

import pytest
import torch

from common.tokenizer import load_tokenizer
from conftest import PROJECT_TOKENIZER
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.rl.engines import (NEUTRAL_SAMPLING, NO_LOGPROB, RolloutEngineError, SGLangEngine, VLLMEngine,
                                    check_sampler_ratio)

TOKENIZER = load_tokenizer()
EOS = TOKENIZER.eos_token_id
CONFIG = MiniMindConfig(hidden_size=64, num_hidden_layers=2)


class StandIn(http.server.BaseHTTPRequestHandler):
    """Answers as SGLang or vLLM would, from the server's `script`: {path: [answers, ...]} (the last one repeats);
    an answer is (status, body). Records every request as (method, path, headers, body)."""

    def answer(self, method):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        self.server.requests.append((method, self.path, dict(self.headers), body))
        answers = self.server.script.get(self.path, [(404, {"detail": "Not Found"})])
        status, reply = answers.pop(0) if len(answers) > 1 else answers[0]
        if callable(reply):
            reply = reply(body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.answer("POST")

    def do_GET(self):
        self.answer("GET")

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.requests, server.script = [], {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


def sglang_answer(body):
    """One answer per prompt: two tokens and eos, the first with SGLang's clamped -inf, the second with NaN's null."""
    return [{"text": "", "meta_info": {"finish_reason": {"type": "stop", "matched": EOS},
                                       "output_token_logprobs": [[-3.4028234663852886e+38, 5, None], [None, 6, None],
                                                                 [-0.25, EOS, None]]}}
            for _ in body["input_ids"]]


def vllm_answer(body):
    return {"choices": [{"index": 0, "text": "", "finish_reason": "stop",
                         "logprobs": {"tokens": ["token_id:5", f"token_id:{EOS}"], "token_logprobs": [-9999.0, -0.5]}}]}


def make(cls, url, tmp_path, **kwargs):
    return cls(url, TOKENIZER, 0.7, PROJECT_TOKENIZER, str(tmp_path / "sync"), 1, 5, CONFIG, **kwargs)


def test_sglang_sends_neutral_settings_a_seed_per_prompt_and_the_key(stand_in, tmp_path):
    stand_in.script = {"/generate": [(200, sglang_answer)]}
    engine = make(SGLangEngine, stand_in.url, tmp_path, api_key="k3y")
    samples = engine.generate([[1, 2], [1, 2], [1, 2]], 8)
    assert samples == [([5, 6, EOS], [NO_LOGPROB, NO_LOGPROB, -0.25])] * 3  # -inf and null read as vLLM writes -inf
    _, _, headers, body = stand_in.requests[-1]
    assert headers["Authorization"] == "Bearer k3y"
    params = body["sampling_params"]
    assert len(params) == 3 and len({p["sampling_seed"] for p in params}) == 3  # the copies of a prompt must differ
    for p in params:
        assert {k: p[k] for k in NEUTRAL_SAMPLING} == NEUTRAL_SAMPLING and p["temperature"] == 0.7
        assert NEUTRAL_SAMPLING == {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                                    "presence_penalty": 0.0, "frequency_penalty": 0.0}
    # an SGLang before 0.5.3 refuses sampling_seed: none is sent to it
    stand_in.script["/get_server_info"] = [(200, {"version": "0.5.2"})]
    make(SGLangEngine, stand_in.url, tmp_path).generate([[1, 2]], 8)
    assert isinstance(stand_in.requests[-1][3]["sampling_params"], dict)
    assert "sampling_seed" not in stand_in.requests[-1][3]["sampling_params"]


def test_vllm_sends_one_request_a_prompt_with_its_seed_and_neutral_settings(stand_in, tmp_path):
    stand_in.script = {"/v1/models": [(200, {"data": [{"id": "m", "root": "/nowhere"}]})],
                       "/version": [(200, {"version": "0.17.1"})], "/v1/completions": [(200, vllm_answer)]}
    engine = make(VLLMEngine, stand_in.url, tmp_path)
    assert engine.generate([[1, 2], [1, 2]], 4) == [([5, EOS], [NO_LOGPROB, -0.5])] * 2
    bodies = [b for _, path, _, b in stand_in.requests if path == "/v1/completions"]
    assert len(bodies) == 2 and bodies[0]["seed"] != bodies[1]["seed"]  # vLLM gives a request's prompts one seed
    assert all({k: b[k] for k in NEUTRAL_SAMPLING} == NEUTRAL_SAMPLING and b["prompt"] == [[1, 2]] for b in bodies)


def test_transient_failures_are_retried_and_aborts_are_errors(stand_in, tmp_path):
    stand_in.script = {"/generate": [(503, {"error": "busy"}), (502, {"error": "proxy"}), (200, sglang_answer)]}
    engine = make(SGLangEngine, stand_in.url, tmp_path, retries=2, backoff=0.01)
    assert len(engine.generate([[1]], 4)) == 1
    stand_in.script = {"/generate": [(503, {"error": "still busy"})]}
    with pytest.raises(RolloutEngineError, match=r"HTTP 503.*still busy.*tried 3 times"):
        engine.generate([[1]], 4)
    stand_in.script = {"/generate": [(401, {"error": "key"})]}
    with pytest.raises(RolloutEngineError, match="--rollout_api_key"):
        engine.generate([[1]], 4)
    aborted = [{"meta_info": {"finish_reason": {"type": "abort", "message": "Aborted by /pause"},
                              "output_token_logprobs": [[-0.1, 5, None]]}}]
    stand_in.script = {"/generate": [(200, aborted)]}
    with pytest.raises(RolloutEngineError, match="aborted a request: Aborted by /pause"):
        engine.generate([[1]], 4)
    stand_in.script = {"/v1/models": [(200, {"data": [{"id": "m"}]})], "/version": [(200, {"version": "0.16.0"})],
                       "/v1/completions": [(200, {"choices": [dict(vllm_answer(None)["choices"][0],
                                                                   finish_reason="abort")]})]}
    with pytest.raises(RolloutEngineError, match="finish_reason 'abort'"):
        make(VLLMEngine, stand_in.url, tmp_path).generate([[1]], 4)


def tiny_policy():
    torch.manual_seed(0)
    return MiniMindForCausalLM(CONFIG).eval()


def test_vllm_releases_are_checked_and_old_ones_reload_the_folder_they_serve(stand_in, tmp_path):
    stand_in.script = {"/v1/models": [(200, {"data": [{"id": "m", "root": str(tmp_path / "served")}]})],
                       "/version": [(200, {"version": "0.9.2"})]}
    with pytest.raises(SystemExit, match=r"vLLM 0\.9\.2.*needs vLLM >= 0\.10\.2"):
        make(VLLMEngine, stand_in.url, tmp_path)
    stand_in.script["/version"] = [(200, {"version": "0.12.0"})]
    with pytest.raises(SystemExit, match="reloads weights only from the folder it was started with"):
        make(VLLMEngine, stand_in.url, tmp_path)  # no model folder there
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "config.json").write_text("{}")
    stand_in.script.update({"/collective_rpc": [(200, {"results": [None]})], "/reset_prefix_cache": [(200, {})]})
    engine = make(VLLMEngine, stand_in.url, tmp_path)
    engine.maybe_sync(tiny_policy(), 0)
    rpc = [b for _, path, _, b in stand_in.requests if path == "/collective_rpc"]
    assert rpc == [{"method": "reload_weights", "kwargs": {}}]  # the no-argument reload of vLLM < 0.16
    assert json.loads((tmp_path / "served" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sorted(os.listdir(tmp_path)) == ["served"]  # the old weights, kept aside until the reload, are gone
    stand_in.script["/version"] = [(200, {"version": "0.16.0"})]
    make(VLLMEngine, stand_in.url, tmp_path).maybe_sync(tiny_policy(), 0)
    assert stand_in.requests[-2][3] == {"method": "reload_weights",
                                        "kwargs": {"weights_path": str(tmp_path / "sync" / "step_0")}}


def test_the_previous_sync_folder_stays_until_the_engine_loaded_the_new_one(stand_in, tmp_path):
    stand_in.script = {"/update_weights_from_disk": [(200, {"success": True})]}
    engine = make(SGLangEngine, stand_in.url, tmp_path)
    engine.maybe_sync(tiny_policy(), 0)
    stand_in.script = {"/update_weights_from_disk": [(400, {"success": False, "message": "Failed to update"})]}
    with pytest.raises(RolloutEngineError, match="Failed to update"):
        engine.maybe_sync(tiny_policy(), 1)
    assert os.path.isdir(tmp_path / "sync" / "step_0")  # what the engine still serves, if it restarts
    stand_in.script = {"/update_weights_from_disk": [(200, {"success": True})]}
    engine.maybe_sync(tiny_policy(), 1)
    assert os.listdir(tmp_path / "sync") == ["step_1"]


class Synced:
    """An engine as the check sees it: its name, whether it returns log-probs, its weights' staleness."""

    def __init__(self, name, logprobs=True, stale=0):
        self.name, self.logprobs, self.stale = name, logprobs, stale

    def staleness(self, steps_done):
        return self.stale


def test_the_sampler_ratio_check_names_the_engine_setting():
    check_sampler_ratio(Synced("vllm"), 3, {"ratio": 1.03}, 0.05)  # within the tolerance
    check_sampler_ratio(Synced("vllm"), 3, {"ratio": 3.0}, 0)      # off
    check_sampler_ratio(Synced("vllm", stale=1), 3, {"ratio": 3.0}, 0.05)  # stale weights: rho may move
    check_sampler_ratio(Synced("torch", logprobs=False), 3, {}, 0.05)  # pi_old from a forward: nothing to check
    with pytest.raises(SystemExit, match="--logprobs-mode processed_logprobs"):
        check_sampler_ratio(Synced("vllm"), 3, {"ratio": 0.7}, 0.05)
    with pytest.raises(SystemExit, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        check_sampler_ratio(Synced("sglang"), 3, {"ratio": 1.2}, 0.05)


def test_a_run_whose_engine_returns_other_log_probs_stops_at_the_first_update(stand_in, tmp_path):
    """A vLLM-style engine whose log-probs are not those it sampled with (here: near 0 for every token, as raw
    log-probs of a peaked model would be): right after the first sync the ratio is far from 1 and the run stops."""
    from test_train import run_script
    answer = TOKENIZER("84", add_special_tokens=False).input_ids + [EOS]
    stand_in.script = {
        "/v1/models": [(200, {"data": [{"id": "m"}]})], "/version": [(200, {"version": "0.16.0"})],
        "/collective_rpc": [(200, {"results": [None]})], "/reset_prefix_cache": [(200, {})],
        "/v1/completions": [(200, {"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {
            "tokens": [f"token_id:{t}" for t in answer], "token_logprobs": [-0.01] * len(answer)}}]})]}
    result = run_script("train_agent.py", "--from_weight", "none", "--num_generations", "2", "--batch_size", "1",
                        "--max_steps", "1", "--rollout_engine", "vllm", "--rollout_url", stand_in.url,
                        "--sync_dir", str(tmp_path / "sync"), tmp=tmp_path, check=False)
    assert result.returncode != 0 and "right after a weight sync the mean ratio" in result.stderr
    assert "--logprobs-mode processed_logprobs" in result.stderr


def test_the_api_key_comes_from_the_flag_else_the_servers_variable(stand_in, tmp_path, monkeypatch):
    import argparse
    from trainer.rl.engines import make_engine
    stand_in.script = {"/generate": [(200, sglang_answer)]}
    args = argparse.Namespace(rollout_engine="sglang", rollout_url=stand_in.url, temperature=1.0, sync_dir=None,
                              save_dir=str(tmp_path), sync_interval=1, rollout_timeout=5, rollout_retries=0,
                              rollout_api_key=None)
    monkeypatch.setenv("MINIMIND_API_KEY", "from-env")
    make_engine(args, tiny_policy(), TOKENIZER, PROJECT_TOKENIZER).generate([[1]], 2)
    assert stand_in.requests[-1][2]["Authorization"] == "Bearer from-env"
    args.rollout_api_key = "from-flag"
    make_engine(args, tiny_policy(), TOKENIZER, PROJECT_TOKENIZER).generate([[1]], 2)
    assert stand_in.requests[-1][2]["Authorization"] == "Bearer from-flag"
    from trainer.args import recorded_settings
    assert "rollout_api_key" not in recorded_settings(args)  # never in a tracker's config or a resume file


def test_the_in_process_engine_ignores_sampling_settings_a_model_folder_would_bring():
    """A generation_config.json with a repetition penalty, min-p and top-k would change the distribution generate
    samples from and records: the engine overrides them, so its log-probs stay log softmax(logits / T)."""
    from trainer.rl.engines import TorchEngine
    model = tiny_policy()
    model.generation_config.update(repetition_penalty=1.5, min_p=0.2, top_k=3, no_repeat_ngram_size=2)
    prompt = TOKENIZER("你好，请介绍一下你自己。", add_special_tokens=False).input_ids
    torch.manual_seed(1)
    [(ids, logps)] = TorchEngine(model, TOKENIZER, temperature=0.7).generate([prompt], 12)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float() / 0.7
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logps), expected, atol=1e-4)
