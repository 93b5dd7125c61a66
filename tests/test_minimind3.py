"""The minimind-3 generation beside MiniMind2: its architecture (per-head q/k RMSNorm, explicit head_dim, Qwen3-MoE
style experts) matches transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM, which is what upstream exports
minimind-3 to, so those classes are the specification here."""
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, Qwen3ForCausalLM, Qwen3MoeForCausalLM

from conftest import REPO_ROOT
from model.model_minimind import GENERATIONS, MiniMindConfig, MiniMindForCausalLM
from model.qwen3_format import qwen3_config, to_qwen3_state_dict
from model.weights import config_from_state_dict

from scripts import convert_model

# minimind-3's shape at hidden 64: 8 query heads of 8, 4 key-value heads (as upstream's 768 x 8 has 96-wide heads)
TINY3 = dict(generation="minimind-3", hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)


def upstream_style_weight(path, seed=0, **overrides):
    """A minimind-3 state dict as upstream saves it (fp16), from a randomly initialised model whose matrices
    are scaled up so that attention is far from uniform and any difference in the maths shows in the logits."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**{**TINY3, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(6)
            elif name.endswith("norm.weight"):  # norms away from 1, so a missing q/k norm would show
                param.uniform_(0.5, 1.5)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def both_models(path):
    """(ours, transformers' Qwen3) holding the weights of one upstream-style .pth, in fp32."""
    state = {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    config = config_from_state_dict(state)
    ours = MiniMindForCausalLM(config).eval()
    ours.load_state_dict(state, strict=True)
    qwen3 = AutoModelForCausalLM.from_config(qwen3_config(config)).eval()
    qwen3.load_state_dict(to_qwen3_state_dict(state, config), strict=True)
    return ours, qwen3


def test_named_sizes_have_upstreams_parameter_counts():
    for use_moe, expected in ((False, 63_912_192), (True, 198_416_640)):
        with torch.device("meta"):
            model = MiniMindForCausalLM(MiniMindConfig(generation="minimind-3", hidden_size=768, num_hidden_layers=8,
                                                       use_moe=use_moe))
        assert sum(p.numel() for p in model.parameters()) == expected
    config = MiniMindConfig(generation="minimind-3", hidden_size=768, num_hidden_layers=8)
    assert (config.intermediate_size, config.num_key_value_heads, config.head_dim, config.rms_norm_eps) == \
        (2432, 4, 96, 1e-6) == (64 * math.ceil(768 * math.pi / 64), 4, 768 // 8, 1e-6)
    assert MiniMindConfig().num_key_value_heads == 2 and MiniMindConfig().intermediate_size == 1408  # MiniMind2 as before


def test_keys_are_upstreams():
    """The parameter names upstream's minimind-3 model.py gives (so its .pth files load as they are)."""
    dense = MiniMindForCausalLM(MiniMindConfig(**TINY3)).state_dict()
    layer = "model.layers.0."
    assert {k for k in dense if k.startswith(layer)} == {layer + k for k in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
    assert dense[layer + "self_attn.q_norm.weight"].shape == (8,)
    moe = MiniMindForCausalLM(MiniMindConfig(**TINY3, use_moe=True)).state_dict()
    assert {k for k in moe if k.startswith(layer + "mlp.")} == {layer + "mlp.gate.weight"} | {
        f"{layer}mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
    assert moe[layer + "mlp.gate.weight"].shape == (4, 64)  # no shared expert


@pytest.mark.parametrize("use_moe", [False, True])
def test_logits_equal_transformers_qwen3(tmp_path, use_moe):
    """fp32 logits of the same weights in our model and in Qwen3ForCausalLM / Qwen3MoeForCausalLM: a full
    forward, and a prefill followed by KV-cached steps of one and of several tokens."""
    ours, qwen3 = both_models(upstream_style_weight(tmp_path / "w.pth", use_moe=use_moe))
    assert isinstance(qwen3, Qwen3MoeForCausalLM if use_moe else Qwen3ForCausalLM)
    ids = torch.randint(0, 6400, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, qwen3(ids).logits
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
        layer = ours.model.layers[0].self_attn
        saved = layer.q_norm.weight.detach().clone()
        layer.q_norm.weight.fill_(1.0)  # control: one q-norm left out is a difference the comparison sees
        assert (ours(ids).logits - b).abs().max() > 1e-2
        layer.q_norm.weight.copy_(saved)
        caches = [DynamicCache(config=ours.config), DynamicCache(config=qwen3.config)]
        for start, end in ((0, 20), (20, 21), (21, 27), (27, 28)):
            step = [m(ids[:, start:end], past_key_values=c, use_cache=True).logits for m, c in zip((ours, qwen3), caches)]
            assert (step[0] - step[1]).abs().max() < 1e-5 * max(1.0, step[1].abs().max().item())
            assert (step[0] - a[:, start:end]).abs().max() < 1e-4 * max(1.0, a.abs().max().item())


def test_moe_routes_like_qwen3_moe():
    """Top-1 routing renormalised (every token's weight is 1, as in Qwen3-MoE) and a batch-level balance loss
    0.0005 * E * sum_e f_e P_e; MiniMind2's MoE keeps its shared expert, 2 experts per token and per-sequence loss."""
    config = MiniMindConfig(**TINY3, use_moe=True)
    assert (config.num_experts_per_tok, config.n_shared_experts, config.aux_loss_alpha, config.seq_aux) == \
        (1, 0, 5e-4, False)
    model = MiniMindForCausalLM(config)
    gate = model.model.layers[0].mlp.gate
    x = torch.randn(2, 5, 64)
    idx, weight, aux = gate(x)
    assert torch.equal(weight, torch.ones_like(weight))
    scores = torch.softmax(x.reshape(-1, 64) @ gate.weight.T, dim=-1)
    load = torch.nn.functional.one_hot(idx.view(-1), 4).float().mean(0)
    assert aux.item() == pytest.approx((load * scores.mean(0)).sum().item() * 4 * 5e-4, rel=1e-5)
    minimind2 = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=True)
    assert (minimind2.num_experts_per_tok, minimind2.n_shared_experts, minimind2.seq_aux) == (2, 1, True)


def test_the_architecture_is_read_off_the_keys_not_the_file_name():
    """MiniMind2 768x16 and minimind-3 768x8 both save as *_768.pth: the config comes from keys and shapes."""
    for config in (MiniMindConfig(hidden_size=768, num_hidden_layers=16),
                   MiniMindConfig(generation="minimind-3", hidden_size=768, num_hidden_layers=8),
                   MiniMindConfig(generation="minimind-3", hidden_size=768, num_hidden_layers=8, use_moe=True),
                   MiniMindConfig(hidden_size=640, num_hidden_layers=8, use_moe=True)):
        with torch.device("meta"):
            state = MiniMindForCausalLM(config).state_dict()
        read = config_from_state_dict(state)
        for name in ("generation", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "qk_norm", "use_moe", "n_routed_experts",
                     "n_shared_experts", "num_experts_per_tok", "rms_norm_eps"):
            assert getattr(read, name) == getattr(config, name), name


def test_to_qwen3_writes_a_folder_transformers_loads_without_remote_code(tmp_path):
    pth = upstream_style_weight(tmp_path / "full_sft_64.pth", seed=2)
    folder = convert_model.to_qwen3(str(pth), str(tmp_path / "qwen3"), dtype=torch.float32)
    assert "auto_map" not in open(os.path.join(folder, "config.json")).read()
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours, _ = both_models(pth)
    ids = torch.randint(0, 6400, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - exported(ids).logits).abs().max() < 1e-4
    minimind2 = tmp_path / "minimind2.pth"
    torch.save(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).state_dict(), minimind2)
    with pytest.raises(SystemExit, match="is a MiniMind2 weight"):
        convert_model.to_qwen3(str(minimind2), str(tmp_path / "no"))
    with pytest.raises(SystemExit, match="is a minimind-3 weight"):
        convert_model.to_llama(str(pth), str(tmp_path / "no"))


def test_generations_are_named():
    assert set(GENERATIONS) == {"minimind2", "minimind-3"}
    with pytest.raises(ValueError, match="generation 'minimind3' is unknown"):
        MiniMindConfig(generation="minimind3")


# --------------------------------------------------------------------------------------------
# Training with --generation minimind-3
# --------------------------------------------------------------------------------------------

def test_stages_train_and_resume_as_minimind3(tmp_path):
    """Pretraining resumes to the same losses; SFT, DPO and GRPO start from the previous stage's weight, which
    holds the per-head q/k norms."""
    from test_train import metrics, run_script
    common = ["--generation", "minimind-3", "--dtype", "float32"]
    run_script("train_pretrain.py", *common, "--max_steps", "4", tmp=tmp_path / "straight")
    run_script("train_pretrain.py", *common, "--max_steps", "2", tmp=tmp_path)
    run_script("train_pretrain.py", *common, "--max_steps", "4", "--from_resume", "1", tmp=tmp_path)
    name = "pretrain_64_metrics.jsonl"
    assert [m["loss"] for m in metrics(tmp_path, name)] == [m["loss"] for m in metrics(tmp_path / "straight", name)]
    assert "model.layers.0.self_attn.q_norm.weight" in torch.load(tmp_path / "out" / "pretrain_64.pth", weights_only=True)
    run_script("train_full_sft.py", *common, "--max_steps", "2", "--from_weight", "pretrain", tmp=tmp_path)
    run_script("train_dpo.py", *common, "--max_steps", "1", "--max_seq_len", "128", tmp=tmp_path)
    run_script("train_grpo.py", *common, *GRPO, tmp=tmp_path)
    for stage in ("full_sft", "dpo", "grpo"):
        assert all(math.isfinite(row["loss"]) for row in metrics(tmp_path, f"{stage}_64_metrics.jsonl"))


GRPO = ["--max_steps", "1", "--reasoning", "0", "--num_generations", "2", "--max_gen_len", "8", "--batch_size", "2"]


def test_moe_stages_as_minimind3(tmp_path):
    """The Qwen3-MoE layout trains (no shared expert saved) and every stage adds its balance loss."""
    from test_train import metrics, run_script
    common = ["--generation", "minimind-3", "--use_moe", "1", "--dtype", "float32"]
    run_script("train_full_sft.py", *common, "--max_steps", "2", "--from_weight", "none", tmp=tmp_path)
    run_script("train_grpo.py", *common, *GRPO, tmp=tmp_path)
    state = torch.load(tmp_path / "out" / "grpo_64_moe.pth", weights_only=True)
    assert "model.layers.0.mlp.gate.weight" in state and not any("shared_experts" in k for k in state)
    for stage in ("full_sft", "grpo"):
        assert all(row["aux_loss"] > 0 for row in metrics(tmp_path, f"{stage}_64_moe_metrics.jsonl"))


def test_a_weight_of_the_other_generation_is_named(tmp_path):
    from test_train import run_script
    run_script("train_pretrain.py", "--max_steps", "1", "--dtype", "float32", tmp=tmp_path)  # MiniMind2
    result = run_script("train_full_sft.py", "--generation", "minimind-3", "--max_steps", "1", "--from_weight",
                        "pretrain", tmp=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "holds a minimind2 model, and this run builds a minimind-3 one: pass --generation minimind2" in \
        result.stderr + result.stdout


@pytest.mark.parametrize("use_moe", [False, True])
def test_a_qwen3_folder_loads_as_our_model(tmp_path, use_moe):
    """A released minimind-3 folder (Qwen3 format) loads back into MiniMindForCausalLM with the same logits, also
    through the chat loader that eval_llm.py, the server and the web chat use."""
    from inference.chat_core import load_chat_model
    from model.qwen3_format import from_qwen3_state_dict, load_qwen3_folder
    pth = upstream_style_weight(tmp_path / "w.pth", seed=4, use_moe=use_moe)
    folder = convert_model.to_qwen3(str(pth), str(tmp_path / "released"), dtype=torch.float32)
    ours, qwen3 = both_models(pth)
    loaded = load_qwen3_folder(folder).eval()
    chat = load_chat_model(folder, device="cpu")
    ids = torch.randint(0, 6400, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert isinstance(chat.model, MiniMindForCausalLM) and torch.equal(chat.model(ids).logits, expected)
    assert loaded.config.use_moe == use_moe and loaded.config.generation == "minimind-3"
    # in memory transformers 5 holds Qwen3-MoE experts stacked: that layout converts back too
    back = from_qwen3_state_dict(qwen3.state_dict(), ours.config)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


# --------------------------------------------------------------------------------------------
# A weight and its tokenizer: --tokenizer_dir, and the checks that they belong together
# --------------------------------------------------------------------------------------------

PROJECT_TOKENIZER = os.path.join(REPO_ROOT, "model")


def other_tokenizer(folder, seed=0):
    """Another vocabulary, as minimind-3's is: the project's tokenizer with the ids of its ordinary tokens shuffled
    (the same text splits into the same pieces, which get other ids). Returns the folder."""
    import json
    import random
    import shutil
    with open(os.path.join(PROJECT_TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    added = {t["id"] for t in spec["added_tokens"]}
    ordinary = sorted(i for i in spec["model"]["vocab"].values() if i not in added)
    shuffled = random.Random(seed).sample(ordinary, len(ordinary))
    new_id = dict(zip(ordinary, shuffled))
    spec["model"]["vocab"] = {token: new_id.get(i, i) for token, i in spec["model"]["vocab"].items()}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    shutil.copy(os.path.join(PROJECT_TOKENIZER, "tokenizer_config.json"), folder)
    return str(folder)


def weight_that_reads(tokenizer_dir, path, steps=30):
    """A tiny minimind-3 weight trained for a few dozen steps on the demo pretraining text as tokenizer_dir encodes
    it - never on the probe sentence: it reads that tokenizer's ids a little, as an early checkpoint does."""
    import json
    import random
    import re
    from common.tokenizer import PROBE_TEXT, load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "pretrain.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f]
    random.Random(0).shuffle(rows)  # Chinese and English rows mixed
    text = tokenizer.bos_token.join(rows[:100])
    assert not any(sentence in text for sentence in re.split(r"(?<=[。.])", PROBE_TEXT) if len(sentence) > 5)
    batches = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:steps * 8 * 32]).view(steps, 8, 32)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and loses much when the cores are busy
    try:
        for ids in batches:
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    """(a tokenizer folder other than the project's, a minimind-3 .pth trained with it, with no record beside it, as
    a weight downloaded from elsewhere). The tokenizer folder lies beside the weight, where the probe looks."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    other = other_tokenizer(tmp / "other")
    return other, weight_that_reads(other, tmp / "full_sft_64.pth")


def load_weight(path):
    state = {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    model = MiniMindForCausalLM(config_from_state_dict(state))
    model.load_state_dict(state)
    return model


def test_the_probe_tells_the_tokenizer_a_weight_reads(other_pair, capsys):
    """A weight without a record, trained on other text than the probe sentence, for a few dozen steps: its loss
    with its own tokenizer is only a little below uniform guessing, but clearly below the loss with another."""
    from common.tokenizer import CLEARLY, check_tokenizer_fits, load_tokenizer, probe_loss
    other, weight = other_pair
    model = load_weight(weight)
    mine, project = load_tokenizer(other), load_tokenizer(PROJECT_TOKENIZER)
    assert probe_loss(model, mine) < probe_loss(model, project) - CLEARLY
    # model/ in use: the tokenizer beside the weight reads better, and is named
    with pytest.raises(SystemExit, match=rf"does not read the token ids of the tokenizer in {PROJECT_TOKENIZER}: .*"
                                         rf"It reads the tokenizer in {other}: pass --tokenizer_dir {other}"):
        check_tokenizer_fits(model, project, PROJECT_TOKENIZER, weight)
    check_tokenizer_fits(model, project, PROJECT_TOKENIZER, weight, chosen=True)  # named: a warning
    assert f"warning: {weight} does not read" in capsys.readouterr().err
    check_tokenizer_fits(model, mine, other, weight)  # its own: no stop
    # a fresh random weight reads every tokenizer alike: the probe cannot tell, says so, and lets it through
    fresh = MiniMindForCausalLM(MiniMindConfig(**TINY3))
    assert abs(probe_loss(fresh, project) - math.log(6400)) < 0.1
    check_tokenizer_fits(fresh, project, PROJECT_TOKENIZER, weight)
    assert "note: the probe cannot confirm" in capsys.readouterr().err


def test_a_weight_holding_nan_is_reported_as_such(other_pair, tmp_path):
    from inference.chat_core import load_chat_model
    state = torch.load(other_pair[1], weights_only=True)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "broken_64.pth")
    for tokenizer_dir in (None, other_pair[0]):
        with pytest.raises(SystemExit, match=r"broken_64.pth holds non-finite values \(nan or inf\) in 1 of its "
                                             r"tensors \(model.layers.1.mlp.up_proj.weight\)"):
            load_chat_model(str(tmp_path / "broken_64.pth"), device="cpu", tokenizer_dir=tokenizer_dir)


def recorded_weight(path, tokenizer_dir):
    """A random minimind-3 .pth with the record of tokenizer_dir beside it, as the trainers save them."""
    from common.tokenizer import load_tokenizer, tokenizer_fields, write_record
    torch.manual_seed(1)
    torch.save({k: v.half() for k, v in MiniMindForCausalLM(MiniMindConfig(**TINY3)).state_dict().items()}, path)
    write_record(str(path), tokenizer_fields(load_tokenizer(tokenizer_dir), tokenizer_dir), "minimind-3")
    return str(path)


def test_a_weights_record_names_its_tokenizer(other_pair, tmp_path, capsys):
    """The record beside a .pth is checked on every load, in place of the probe: another vocabulary stops the load
    whatever was asked, naming both tokenizers; its own loads without a word; a record of another file (the weight
    replaced) is left aside for the probe."""
    import json
    import shutil
    from common.tokenizer import record_path, tokenizer_id
    from inference.chat_core import load_chat_model
    other = other_pair[0]
    weight = recorded_weight(tmp_path / "full_sft_64.pth", other)
    record = json.load(open(record_path(weight), encoding="utf-8"))
    assert record_path(weight) == str(tmp_path / "full_sft_64.tokenizer.json")
    assert (record["tokenizer_dir"], record["vocab_hash"], record["generation"]) == \
        (other, tokenizer_id(AutoTokenizer.from_pretrained(other)), "minimind-3")
    named = (rf"full_sft_64.pth was trained with the tokenizer in {other} \(vocabulary {record['vocab_hash']}.*"
             rf"records, and this load uses the one in {PROJECT_TOKENIZER} \(vocabulary "
             rf"{tokenizer_id(AutoTokenizer.from_pretrained(PROJECT_TOKENIZER))}.*Pass --tokenizer_dir {other}\.")
    for tokenizer_dir in (None, PROJECT_TOKENIZER):  # named or not: the ids would mean other text
        with pytest.raises(SystemExit, match=named):
            load_chat_model(weight, device="cpu", tokenizer_dir=tokenizer_dir)
    capsys.readouterr()
    load_chat_model(weight, device="cpu", tokenizer_dir=other)  # a random weight, which the probe would doubt
    assert capsys.readouterr().err == ""
    # the trained weight saved over it: the record describes another file, and the probe takes over
    shutil.copy(other_pair[1], weight)
    shutil.copytree(other, tmp_path / "other")  # beside the weight, where the probe looks
    with pytest.raises(SystemExit, match=rf"It reads the tokenizer in {tmp_path / 'other'}"):
        load_chat_model(weight, device="cpu")
    assert "describes another file" in capsys.readouterr().err


def test_a_weights_record_names_its_chat_template(tmp_path, capsys):
    """The same vocabulary with another chat template: refused, or a warning when that tokenizer is named."""
    import json
    import shutil
    from inference.chat_core import load_chat_model
    edited = tmp_path / "edited"
    shutil.copytree(PROJECT_TOKENIZER, edited, ignore=lambda folder, names: [n for n in names
                                                                           if not n.startswith("tokenizer")])
    config = json.load(open(edited / "tokenizer_config.json", encoding="utf-8"))
    config["chat_template"] = config["chat_template"].replace("You are a helpful assistant", "You are MiniMind")
    json.dump(config, open(edited / "tokenizer_config.json", "w", encoding="utf-8"), ensure_ascii=False)
    weight = recorded_weight(tmp_path / "full_sft_64.pth", str(edited))
    with pytest.raises(SystemExit, match=rf"trained with the tokenizer in {edited} .* the same token ids, but another "
                                         rf"chat template.*Pass --tokenizer_dir {edited}\."):
        load_chat_model(weight, device="cpu")
    capsys.readouterr()
    load_chat_model(weight, device="cpu", tokenizer_dir=PROJECT_TOKENIZER)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "another chat template" in err


def test_the_converters_check_and_carry_the_record(other_pair, tmp_path):
    """An export copies a tokenizer into what it writes: the weight's record must name it. A merged LoRA keeps the
    base's record."""
    from common.tokenizer import read_record
    from model.model_lora import apply_lora, save_lora
    other = other_pair[0]
    weight = recorded_weight(tmp_path / "full_sft_64.pth", other)
    with pytest.raises(SystemExit, match=rf"trained with the tokenizer in {other} .*Pass --tokenizer_dir {other}\."):
        convert_model.to_qwen3(weight, str(tmp_path / "no"))  # model/ by default
    assert not os.path.exists(tmp_path / "no")
    convert_model.to_qwen3(weight, str(tmp_path / "released"), tokenizer_dir=other)
    model = load_weight(weight)
    apply_lora(model, rank=2)
    save_lora(model, str(tmp_path / "lora_64.pth"))
    merged = convert_model.merge_lora_file(weight, str(tmp_path / "lora_64.pth"), str(tmp_path / "merged_64.pth"))
    assert read_record(merged)["vocab_hash"] == read_record(weight)["vocab_hash"]


def test_the_chat_loader_refuses_a_tokenizer_the_weight_does_not_read(other_pair, tmp_path, capsys):
    from inference.chat_core import load_chat_model
    other, weight = other_pair
    with pytest.raises(SystemExit, match=r"does not read the token ids of the tokenizer in .*model: .*--tokenizer_dir"):
        load_chat_model(weight, device="cpu")  # the default tokenizer (model/) is not the one it was trained with
    chat = load_chat_model(weight, device="cpu", tokenizer_dir=other)
    assert chat.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(other).get_vocab()
    capsys.readouterr()
    load_chat_model(weight, device="cpu", tokenizer_dir=PROJECT_TOKENIZER)  # named: a warning, not a stop
    assert "warning:" in capsys.readouterr().err
    # a released folder ships its tokenizer: it is used, and another one named beside it is refused
    folder = convert_model.to_qwen3(weight, str(tmp_path / "released"), dtype=torch.float32, tokenizer_dir=other)
    chat = load_chat_model(folder, device="cpu")
    assert chat.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(other).get_vocab()
    with pytest.raises(SystemExit, match=r"ships its own tokenizer, and --tokenizer_dir .* is another one: \d+ of its"):
        load_chat_model(folder, device="cpu", tokenizer_dir=PROJECT_TOKENIZER)


def test_trainers_take_the_tokenizer_and_a_released_folder(other_pair, tmp_path):
    from common.tokenizer import read_record, tokenizer_id
    from inference.chat_core import load_chat_model
    from test_train import run_script
    other, weight = other_pair
    common = ["--generation", "minimind-3", "--dtype", "float32", "--max_steps", "1"]
    refused = run_script("train_full_sft.py", *common, "--from_weight", weight, tmp=tmp_path, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "does not read the token ids of the tokenizer" in refused.stdout + refused.stderr
    run_script("train_full_sft.py", *common, "--from_weight", weight, "--tokenizer_dir", other, tmp=tmp_path)
    # the weight it saved records that tokenizer, which every load then checks
    saved = str(tmp_path / "out" / "full_sft_64.pth")
    assert read_record(saved)["vocab_hash"] == tokenizer_id(AutoTokenizer.from_pretrained(other))
    with pytest.raises(SystemExit, match=rf"full_sft_64.pth was trained with the tokenizer in {other} .*"
                                         rf"this load uses the one in {PROJECT_TOKENIZER} .*--tokenizer_dir {other}"):
        load_chat_model(saved, device="cpu")
    # --from_weight of a released folder: its weights, and the tokenizer it ships, which the LoRA's record names
    folder = convert_model.to_qwen3(weight, str(tmp_path / "released"), dtype=torch.float32, tokenizer_dir=other)
    result = run_script("train_lora.py", *common, "--from_weight", folder, tmp=tmp_path)
    assert f"tokenizer: {folder}" in result.stdout and f"loaded {folder}" in result.stdout
    assert read_record(str(tmp_path / "out" / "lora" / "lora_medical_64.pth"))["tokenizer_dir"] == folder
    with pytest.raises(SystemExit, match=r"lora_medical_64.pth was trained with the tokenizer in .*released"):
        load_chat_model(str(recorded_weight(tmp_path / "base_64.pth", PROJECT_TOKENIZER)), device="cpu",
                        lora_path=str(tmp_path / "out" / "lora" / "lora_medical_64.pth"))
    # a resume file remembers its tokenizer
    run_script("train_pretrain.py", *common, "--tokenizer_dir", other, tmp=tmp_path / "resume")
    result = run_script("train_pretrain.py", *common[:-1], "2", "--from_resume", "1", tmp=tmp_path / "resume",
                        check=False)
    assert result.returncode != 0 and "was trained with another tokenizer" in result.stdout + result.stderr


RL = ["--max_gen_len", "8", "--batch_size", "2", "--reasoning", "0", "--learning_rate", "1e-3"]


@pytest.mark.parametrize("use_moe", ["1"])
def test_lora_ppo_spo_reasoning_and_distillation_run_as_minimind3(tmp_path, use_moe):
    """The stages the tests above leave out, each from a minimind-3 SFT weight: every loss finite, MoE steps with
    their balance loss; a minimind-3-moe PPO run (actor, critic, old actor) resumes to the same metrics as an
    uninterrupted one. MoE only, to keep the suite short: it runs the minimind-3 attention the dense model has,
    and use_moe "0" runs the same stages dense (measured passing)."""
    import shutil
    from test_train import metrics, run_script
    common = ["--generation", "minimind-3", "--use_moe", use_moe, "--dtype", "float32"]
    moe = "_moe" if use_moe == "1" else ""
    run_script("train_full_sft.py", *common, "--max_steps", "1", "--from_weight", "none", tmp=tmp_path)
    run_script("train_lora.py", *common, "--max_steps", "1", tmp=tmp_path)
    run_script("train_distill_reason.py", *common, "--max_steps", "1", "--from_weight", "full_sft", tmp=tmp_path)
    run_script("train_spo.py", *common, *RL, "--max_steps", "1", tmp=tmp_path)
    run_script("train_distillation.py", *common, "--student_hidden_size", "32", "--student_num_layers", "1",
               "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--from_weight", "none", "--max_steps", "1",
               tmp=tmp_path)
    run_script("train_ppo.py", *common, *RL, "--max_steps", "2", tmp=tmp_path)
    for name in ["lora_medical", "reason", "spo", "full_dist", "ppo_actor"]:  # lora_medical: minimind-3's LoRA name
        size = 32 if name == "full_dist" else 64
        rows = metrics(tmp_path, f"{name}_{size}{moe}_metrics.jsonl")
        assert rows and all(math.isfinite(row["loss"]) for row in rows), name
        if moe and name != "lora_medical":  # LoRA's adapters sit on attention: the frozen router is not trained
            assert all(row["aux_loss"] > 0 for row in rows), name
    assert "model.layers.0.self_attn.q_norm.weight" in torch.load(tmp_path / "out" / f"ppo_actor_64{moe}.pth",
                                                                  weights_only=True)
    if moe:
        resumed = tmp_path / "resumed"
        (resumed / "out").mkdir(parents=True)
        shutil.copy(tmp_path / "out" / "full_sft_64_moe.pth", resumed / "out")
        run_script("train_ppo.py", *common, *RL, "--max_steps", "1", tmp=resumed)
        run_script("train_ppo.py", *common, *RL, "--max_steps", "2", "--from_resume", "1", tmp=resumed)
        drop = ("time", "tokens_per_s")
        assert [{k: v for k, v in m.items() if k not in drop} for m in metrics(resumed, "ppo_actor_64_moe_metrics.jsonl")] \
            == [{k: v for k, v in m.items() if k not in drop} for m in metrics(tmp_path, "ppo_actor_64_moe_metrics.jsonl")]
