"""Exports into third-party engines: GGUF read back and run by llama.cpp, merge_lora, lm-evaluation-harness."""
import csv
import glob
import json
import os
import random
import subprocess

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO_ROOT, talkative_weight, tiny_model
from forked_python import run_python
from model.model_lora import apply_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

from inference.chat_core import load_chat_model
from scripts.convert_model import rope_pairs_interleaved
from scripts.eval_benchmark import PROMPT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "convert_model.py")
TOKENIZER = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "model"))
# Chinese, English, emoji, code, accents, digits, whitespace runs and the added tokens, in one string.
MIXED_TEXT = ("Hello, 世界! 我们今天学习 MiniMind 🤖🚀 and it's 3.14159 l'été naïve café\n"
              "def f(x):\n    return x**2  # 平方\n\t\t<think>想一想</think><answer>42</answer> "
              "<tool_call>{\"name\": \"calc\", \"arguments\": {\"expr\": \"1+1\"}}</tool_call>  end   ")
CHAT = [{"role": "user", "content": "你好，请介绍一下你自己。Who are you?"}]


def convert(*args):
    result = run_python([SCRIPT, *args], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def native_model(path):
    state = torch.load(path, weights_only=True)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@pytest.fixture(scope="module")
def talkative(tmp_path_factory):
    """A random 64x2 model with greedy answers of varied tokens, and its GGUF exports."""
    folder = tmp_path_factory.mktemp("gguf")
    weight = talkative_weight(folder / "full_sft_64.pth")
    for outtype in ("f32", "q8_0"):
        convert("to_gguf", str(weight), str(folder / f"minimind-{outtype}.gguf"), "--outtype", outtype)
    return folder


def field(reader, key):
    return reader.fields[key].contents()


def test_gguf_holds_the_llama_architecture_vocabulary_and_template(talkative):
    reader = gguf.GGUFReader(talkative / "minimind-f32.gguf")
    assert field(reader, "general.architecture") == "llama"
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2)
    assert field(reader, "llama.block_count") == 2 and field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.attention.head_count") == config.num_attention_heads
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "llama.rope.freq_base") == config.rope_theta
    assert field(reader, "llama.rope.dimension_count") == 64 // config.num_attention_heads
    # the vocabulary, in id order, and how llama.cpp is to split text before BPE
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == TOKENIZER.convert_ids_to_tokens(list(range(len(TOKENIZER))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[TOKENIZER.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[TOKENIZER.convert_tokens_to_ids("<tool_call>")] == gguf.TokenType.USER_DEFINED
    assert types[TOKENIZER.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    merges = json.load(open(os.path.join(REPO_ROOT, "model", "tokenizer.json"), encoding="utf-8"))["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert field(reader, "tokenizer.ggml.eos_token_id") == TOKENIZER.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == TOKENIZER.chat_template
    # tensors: q / k rows reordered for llama.cpp's pairwise RoPE, the tied lm_head left out
    state = native_model(talkative / "full_sft_64.pth").state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 9 * 2
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    assert np.array_equal(q, rope_pairs_interleaved(state["model.layers.1.self_attn.q_proj.weight"], 8).numpy())
    k = np.asarray(tensors["blk.0.attn_k.weight"].data)
    assert np.array_equal(k, rope_pairs_interleaved(state["model.layers.0.self_attn.k_proj.weight"], 2).numpy())
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_gate.weight"].data),
                          state["model.layers.0.mlp.gate_proj.weight"].numpy())
    # q8_0: matrices quantised, norms kept in f32; the Modelfile names the file and the end-of-turn stops
    quantised = {t.name: t.tensor_type for t in gguf.GGUFReader(talkative / "minimind-q8_0.gguf").tensors}
    assert quantised["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert quantised["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    modelfile = (talkative / "minimind-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./minimind-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>{{ .Role }}" in modelfile


def test_rope_reordering_leaves_attention_scores_unchanged():
    """Rotate-half RoPE on (q, k) == pairwise RoPE on the reordered rows: the scores q.k agree."""
    torch.manual_seed(0)
    head_dim, heads = 8, 2
    weight_q, weight_k, x, y = torch.randn(heads * head_dim, 16), torch.randn(heads * head_dim, 16), \
        torch.randn(16), torch.randn(16)
    inverse_frequencies = 1 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def rotate_half(v, position):  # (x_i, x_{i+d/2}) pairs
        cos, sin = (position * inverse_frequencies).cos(), (position * inverse_frequencies).sin()
        a, b = v[..., :head_dim // 2], v[..., head_dim // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def rotate_pairs(v, position):  # (x_2i, x_2i+1) pairs
        cos, sin = (position * inverse_frequencies).cos(), (position * inverse_frequencies).sin()
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    q, k = (weight_q @ x).view(heads, head_dim), (weight_k @ y).view(heads, head_dim)  # query at 7, key at 3
    q2 = (rope_pairs_interleaved(weight_q, heads) @ x).view(heads, head_dim)
    k2 = (rope_pairs_interleaved(weight_k, heads) @ y).view(heads, head_dim)
    scores = (rotate_half(q, 7) * rotate_half(k, 3)).sum(-1)
    assert torch.allclose((rotate_pairs(q2, 7) * rotate_pairs(k2, 3)).sum(-1), scores, atol=1e-4)
    # without the reordering llama.cpp would see different scores
    assert not torch.allclose((rotate_pairs(q, 7) * rotate_pairs(k, 3)).sum(-1), scores, atol=1e-2)


def test_gguf_export_refuses_minimind2_moe_and_leaves_no_file(tmp_path):
    torch.save({k: v.half() for k, v in tiny_model(use_moe=True).state_dict().items()}, tmp_path / "moe.pth")
    result = run_python([SCRIPT, "to_gguf", str(tmp_path / "moe.pth"), str(tmp_path / "m.gguf")], timeout=300)
    assert result.returncode != 0 and "MiniMind2 MoE model" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["moe.pth"]


# ---- llama.cpp runs the GGUF -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    from llama_cpp_build import llama_cpp
    return llama_cpp()


def load_gguf(llama_cpp, path):
    return llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)


def our_greedy(model, ids, steps):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                             eos_token_id=TOKENIZER.eos_token_id, pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama_greedy(llm, ids, steps):
    answer = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # temp 0: llama.cpp's greedy sampler
        if llm.token_eos() == token or len(answer) == steps:
            break
        answer.append(token)
    return answer


def test_llama_cpp_tokenizes_like_our_tokenizer(llama_cpp, talkative):
    llm = load_gguf(llama_cpp, talkative / "minimind-f32.gguf")
    try:
        ours = TOKENIZER.encode(MIXED_TEXT)
        # special=True: <|im_start|> & co. are read as tokens, as transformers does (the added tokens always are)
        assert llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True) == ours
        prompt = TOKENIZER.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == TOKENIZER.encode(prompt)
        assert llm.detokenize(ours, special=True).decode() == MIXED_TEXT
    finally:
        llm.close()


def f32_gguf_matches(llama_cpp, path, model, steps):
    """Open an f32 GGUF; check llama.cpp's logits on the chat prompt are ours within float rounding (measured 0.08
    on logits spanning +-14: 0.5%) and its greedy answer is ours. Returns (llm, prompt ids, our logits, answer)."""
    ids = TOKENIZER.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    answer = our_greedy(model, ids, steps)
    llm = load_gguf(llama_cpp, path)
    try:
        llm.eval(ids)
        assert np.abs(np.asarray(llm.scores[:len(ids)]) - ours).max() < 0.01 * np.abs(ours).max()
        assert llama_greedy(llm, ids, steps) == answer
    except BaseException:
        llm.close()
        raise
    return llm, ids, ours, answer


def test_llama_cpp_f32_answers_exactly_like_our_model_and_q8_0_within_tolerance(llama_cpp, talkative):
    model = native_model(talkative / "full_sft_64.pth")
    llm, ids, ours, answer = f32_gguf_matches(llama_cpp, talkative / "minimind-f32.gguf", model, 40)
    try:
        # llama.cpp's own chat path: the Jinja chat template stored in the GGUF renders the same prompt
        reply = llm.create_chat_completion(messages=CHAT, max_tokens=40, temperature=0.0)
        assert reply["choices"][0]["message"]["content"] == TOKENIZER.decode(answer).replace("\ufffd", "")
    finally:
        llm.close()
    quantised = load_gguf(llama_cpp, talkative / "minimind-q8_0.gguf")
    try:
        quantised.eval(ids)
        q8 = np.asarray(quantised.scores[:len(ids)])
        # q8_0 (8-bit weights, 32 per scale) moves logits by a few per cent of their range and keeps the top token
        # at >= 85% of positions (measured: 10% and 94% on this model, whose weights are scaled up 20x)
        assert np.abs(q8 - ours).max() < 0.2 * np.abs(ours).max()
        assert (q8.argmax(-1) == ours.argmax(-1)).mean() >= 0.85
        assert llama_greedy(quantised, ids, 3) == answer[:3]
    finally:
        quantised.close()


@pytest.mark.parametrize("use_moe", [False, True])
def test_llama_cpp_runs_minimind3_as_qwen3_with_our_logits_and_greedy_answer(llama_cpp, tmp_path, use_moe):
    """minimind-3 exports as llama.cpp's qwen3 (per-head q/k norms, halves rotated as here) and minimind-3-moe as
    qwen3moe (experts stacked, top-1 renormalised): llama.cpp gives our logits and our greedy tokens."""
    from test_minimind3 import upstream_style_weight
    from model.weights import config_from_state_dict
    weight = upstream_style_weight(tmp_path / "full_sft_64.pth", seed=3, use_moe=use_moe)
    convert("to_gguf", str(weight), str(tmp_path / "m3.gguf"), "--outtype", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m3.gguf"))
    assert field(reader, "general.architecture") == ("qwen3moe" if use_moe else "qwen3")
    state = {k: v.float() for k, v in torch.load(weight, weights_only=True).items()}
    model = MiniMindForCausalLM(config_from_state_dict(state)).eval()
    model.load_state_dict(state)
    f32_gguf_matches(llama_cpp, tmp_path / "m3.gguf", model, 24)[0].close()


# ---- merge_lora ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 16.0])
def test_merge_lora_gives_the_adapted_models_logits(tmp_path, alpha):
    base = tiny_model(seed=0, num_attention_heads=8)  # MiniMind's 8 heads, as a native weight is read back
    torch.save({k: v.half() for k, v in base.state_dict().items()}, tmp_path / "full_sft_64.pth")
    base.load_state_dict({k: v.float() for k, v in torch.load(tmp_path / "full_sft_64.pth").items()})
    apply_lora(base, rank=4, alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in base.named_parameters():
            if name.endswith("lora.B.weight"):
                param.normal_(0, 0.05)
    save_lora(base, str(tmp_path / "lora_identity_64.pth"), dtype=torch.float32)
    alpha_args = ["--lora_alpha", str(alpha)] if alpha else []
    files = [str(tmp_path / "full_sft_64.pth"), str(tmp_path / "lora_identity_64.pth")]
    convert("merge_lora", *files, str(tmp_path / "merged_64.pth"), "--dtype", "float32", *alpha_args)
    merged = load_chat_model(str(tmp_path / "merged_64.pth"), device="cpu").model
    ids = torch.randint(9, 6400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted, folded = base.eval()(ids).logits, merged(ids).logits
        plain = tiny_model(seed=0, num_attention_heads=8)(ids).logits
    assert not any(".lora." in k for k in torch.load(tmp_path / "merged_64.pth", weights_only=True))
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the answers ...
    assert (folded - adapted).abs().max() < 1e-5  # ... and the merged weight gives the adapted logits
    # by default a half-precision file, like every native weight
    convert("merge_lora", *files, str(tmp_path / "merged_half.pth"), *alpha_args)
    assert all(v.dtype == torch.float16 for v in torch.load(tmp_path / "merged_half.pth", weights_only=True).values())


def test_merge_lora_with_a_mismatched_adapter_says_what_differs(tmp_path):
    torch.save({k: v.half() for k, v in tiny_model(hidden_size=64).state_dict().items()}, tmp_path / "base.pth")
    other = tiny_model(hidden_size=128, num_attention_heads=4)
    apply_lora(other, rank=4)
    save_lora(other, str(tmp_path / "lora.pth"))
    result = run_python([SCRIPT, "merge_lora", str(tmp_path / "base.pth"), str(tmp_path / "lora.pth"),
                         str(tmp_path / "merged.pth")], timeout=300)
    assert result.returncode != 0 and "shape mismatch" in result.stderr
    assert not os.path.exists(tmp_path / "merged.pth")


# ---- lm-evaluation-harness -------------------------------------------------------------------------------

def write_benchmark(folder, count=40, seed=0):
    """A C-Eval-layout CSV of random questions, which a random model answers with varied letters."""
    rng = random.Random(seed)
    words = "天空 太阳 海水 草地 苹果 香蕉 火车 飞机 音乐 数学 历史 化学 math apple river 7 42 3.14 北京 上海".split()
    rows = [{"id": i, "question": " ".join(rng.choices(words, k=rng.randint(2, 9))),
             **{c: " ".join(rng.choices(words, k=rng.randint(1, 3))) for c in "ABCD"}, "answer": rng.choice("ABCD")}
            for i in range(count)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "toy_val.csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def lm_eval_task(folder, csv_path):
    """An lm-evaluation-harness task over the CSV: eval_benchmark.py's plain prompt, the four letters as choices
    scored by log-likelihood, joined to the prompt with no space (target_delimiter), so both score the same tokens."""
    prompt = PROMPT.format(subject="toy", question="{{question}}", A="{{A}}", B="{{B}}", C="{{C}}", D="{{D}}")
    task = {"task": "minimind_toy", "dataset_path": "csv", "dataset_kwargs": {"data_files": {"test": csv_path}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": prompt,
            "doc_to_choice": list("ABCD"), "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "target_delimiter": "", "metric_list": [{"metric": "acc"}]}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "minimind_toy.yaml"), "w", encoding="utf-8") as f:
        json.dump(task, f, ensure_ascii=False)  # JSON is YAML
    return folder


def test_lm_evaluation_harness_runs_offline_and_agrees_with_eval_benchmark(tmp_path):
    weight = talkative_weight(tmp_path / "full_sft_64.pth")
    convert("to_transformers", str(weight), str(tmp_path / "MiniMind2-toy"), "--dtype", "float32")
    csv_path = write_benchmark(str(tmp_path / "bench"))
    task_dir = lm_eval_task(str(tmp_path / "tasks"), csv_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    run = subprocess.run(["lm_eval", "run", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'MiniMind2-toy'},trust_remote_code=True,dtype=float32",
                          "--tasks", "minimind_toy", "--include_path", task_dir, "--device", "cpu", "--batch_size", "8",
                          "--log_samples", "--output_path", str(tmp_path / "lm_eval")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "lm_eval" / "*" / "samples_*.jsonl"))[0])]
    samples.sort(key=lambda s: s["doc_id"])
    loglikelihoods = np.array([[float(choice[0]) for choice in s["filtered_resps"]] for s in samples])
    harness_letters = ["ABCD"[i] for i in loglikelihoods.argmax(-1)]

    bench = run_python([os.path.join(REPO_ROOT, "scripts", "eval_benchmark.py"), "--data_dir",
                        os.path.dirname(csv_path), "--load_from", str(tmp_path / "MiniMind2-toy"), "--prompt_style",
                        "plain", "--output", str(tmp_path / "bench.json"), "--device", "cpu"], timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    ours = json.load(open(tmp_path / "bench.json"))["subjects"]["toy"]
    assert len(set(ours["predictions"])) >= 3  # the items really tell the two apart
    assert harness_letters == ours["predictions"]
    accuracy = json.load(open(glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))[0]))
    assert accuracy["results"]["minimind_toy"]["acc,none"] == pytest.approx(ours["accuracy"])
    # and the harness's log-likelihoods are our model's log-probabilities of the letters
    model = native_model(weight)
    letter_ids = TOKENIZER.convert_tokens_to_ids(list("ABCD"))
    for sample, row in zip(samples[:5], loglikelihoods):
        context = sample["arguments"]["gen_args_0"]["arg_0"]  # the prompt the harness scored "A" after
        assert sample["arguments"]["gen_args_0"]["arg_1"] == "A"
        ids = TOKENIZER.encode(context)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)[letter_ids]
        assert np.allclose(row, logprobs.numpy(), atol=1e-4)
