"""The MiniMind model: MiniMind2 compatibility, Llama equivalence, KV cache, losses, MoE, YaRN, HF integration."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from conftest import tiny_config, tiny_model
from model import kernels
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, MoEGate, MOEFeedForward, rope_inverse_frequencies
from model.weights import load_state_dict_strict


def random_ids(batch, length, seed=0, vocab=6400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def left_padded_batch():
    """Two rows, the second left-padded by 4 positions."""
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


# --------------------------------------------------------------------------------------------
# Compatibility with MiniMind2
# --------------------------------------------------------------------------------------------

def test_config_defaults_match_minimind2():
    c = MiniMindConfig()
    assert c.model_type == "minimind"
    expected = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=6400, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                    hidden_act="silu", dropout=0.0, flash_attn=True, bos_token_id=1, eos_token_id=2,
                    intermediate_size=1408, use_moe=False, n_routed_experts=4, n_shared_experts=1,
                    num_experts_per_tok=2, scoring_func="softmax", aux_loss_alpha=0.01, seq_aux=True,
                    norm_topk_prob=True, inference_rope_scaling=False, tie_word_embeddings=True)
    for key, value in expected.items():
        assert getattr(c, key) == value, key
    assert MiniMindConfig(hidden_size=640).intermediate_size == 1728
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048
    assert MiniMindConfig(intermediate_size=1000).intermediate_size == 1000
    yarn = MiniMindConfig(inference_rope_scaling=True).rope_parameters
    assert yarn == dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=2048,
                        beta_fast=32.0, beta_slow=1.0, attention_factor=1.0)


@pytest.mark.parametrize("kwargs, count", [
    (dict(hidden_size=512, num_hidden_layers=8), 25_829_888),                  # MiniMind2-Small
    (dict(hidden_size=768, num_hidden_layers=16), 104_030_976),                # MiniMind2
    (dict(hidden_size=640, num_hidden_layers=8, use_moe=True), 145_029_760),   # MiniMind2-MoE
])
def test_named_sizes_have_exact_parameter_counts(kwargs, count):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == count  # tied embedding counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_state_dict_uses_the_75_llama_names():
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig())
    keys = set(model.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(8):
        for proj in "qkvo":
            expected.add(f"model.layers.{i}.self_attn.{proj}_proj.weight")
        for proj in ("gate", "up", "down"):
            expected.add(f"model.layers.{i}.mlp.{proj}_proj.weight")
        expected |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
    assert len(expected) == 75 and keys == expected
    # RoPE tables are buffers, rebuilt from the config, never saved.
    assert not any("freqs" in k for k in keys)


def test_moe_state_dict_names():
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig(hidden_size=640, use_moe=True))
    sd = model.state_dict()
    assert list(sd["model.layers.0.mlp.gate.weight"].shape) == [4, 640]
    assert "model.layers.7.mlp.experts.3.down_proj.weight" in sd
    assert "model.layers.7.mlp.shared_experts.0.up_proj.weight" in sd


def llama_twin(model: MiniMindForCausalLM, attn_implementation="sdpa") -> LlamaForCausalLM:
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attn_implementation=attn_implementation))
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama.eval()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_dense_checkpoint_loads_into_llama_with_same_logits(flash_attn):
    model = tiny_model(flash_attn=flash_attn)
    llama = llama_twin(model, "sdpa" if flash_attn else "eager")
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        for pos in (None, positions):
            ours = model(ids, attention_mask=mask, position_ids=pos).logits
            theirs = llama(ids, attention_mask=mask, position_ids=pos).logits
            assert (ours - theirs)[real].abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# KV cache and generation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("flash_attn", [True, False])
def test_cache_plus_new_tokens_equals_full_forward(new_tokens, flash_attn):
    model = tiny_model(flash_attn=flash_attn)
    ids, mask = left_padded_batch()
    prefix = ids.shape[1] - new_tokens
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True).past_key_values
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == prefix
        step = model(ids[:, prefix:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    real = mask[:, prefix:].bool()
    assert (step - full[:, prefix:])[real].abs().max() < 1e-5


def test_chunked_prefill_without_mask():
    model = tiny_model()
    ids = random_ids(1, 15)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        chunks = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                  for a, b in ((0, 4), (4, 5), (5, 11), (11, 15))]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_same_tokens_with_and_without_cache(use_moe):
    model = tiny_model(use_moe=use_moe)
    ids = random_ids(1, 8)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape[1] == 8 + 24 or cached[0, -1] == model.config.eos_token_id
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_model(seed=1)
    rows = [random_ids(1, n, seed=n)[0] for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], max_new_tokens=16, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, width:], alone[0, len(r):]), f"row {i}"


# --------------------------------------------------------------------------------------------
# Loss, logits_to_keep, attention paths
# --------------------------------------------------------------------------------------------

def test_labels_give_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual)
    assert isinstance(out.aux_loss, torch.Tensor) and out.aux_loss.item() == 0.0
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_logits_to_keep():
    model = tiny_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
        assert torch.allclose(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
        chosen = torch.tensor([0, 4, 9])
        assert torch.allclose(model(ids, logits_to_keep=chosen).logits, full[:, chosen], atol=1e-6)


def test_sdpa_and_plain_math_paths_agree():
    sdpa, plain = tiny_model(flash_attn=True), tiny_model(flash_attn=False)
    plain.load_state_dict(sdpa.state_dict())
    ids, mask = left_padded_batch()
    with torch.no_grad():
        for kwargs in (dict(), dict(attention_mask=mask)):
            a, b = sdpa(ids, **kwargs).logits, plain(ids, **kwargs).logits
            assert (a - b)[mask.bool()].abs().max() < 1e-5


def test_attention_uses_sdpa_with_masks_and_caches(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)),
                      kwargs.get("is_causal"), None if attn_mask is None else (attn_mask.data_ptr(), attn_mask.stride())))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(ids)                                                   # training shape: is_causal, no mask
        cache = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).past_key_values
        model(ids[:, 8:], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert len(calls) == 3 * 2  # every forward of both layers went through SDPA
    assert calls[0][1] is None and calls[0][2] is True
    # One additive bias per forward in the compute dtype, shared by both layers (SDPA would turn a bool mask into it
    # in every layer), its rows 16-element aligned for CUDA's memory-efficient kernel
    assert calls[2][1] == (torch.float32, (2, 1, 8, 8))          # padded prefill
    assert calls[4][1] == (torch.float32, (2, 1, 4, 12))         # 4 new tokens against 8 cached
    assert calls[2][3] == calls[3][3] and calls[4][3] == calls[5][3]
    assert calls[2][3][1][-2] % 16 == 0 and calls[4][3][1][-2] % 16 == 0


def test_padding_rows_do_not_produce_nan():
    model = tiny_model()
    ids, mask = left_padded_batch()
    model.train()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------

def test_moe_forward_has_no_host_sync_calls():
    for fn in (MOEFeedForward.forward, kernels.grouped_experts, MOEFeedForward.dense_experts,
               MoEGate.forward, MoEGate.aux_loss):
        source = inspect.getsource(fn)
        for call in (".item(", ".cpu(", ".tolist(", ".nonzero(", "torch.where(", ".numpy("):
            assert call not in source, f"{fn.__qualname__} calls {call}"


def test_moe_train_and_eval_outputs_are_identical():
    model = tiny_model(use_moe=True)
    ids = random_ids(2, 16)
    with torch.no_grad():
        model.train()
        train_out = model(ids)
        model.eval()
        eval_out = model(ids)
    assert torch.equal(train_out.logits, eval_out.logits)
    assert torch.equal(train_out.aux_loss, eval_out.aux_loss) and train_out.aux_loss > 0


def test_moe_grouped_dispatch_equals_dense_reference():
    model = tiny_model(use_moe=True)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 7, 64, requires_grad=True)
    assert kernels.can_group_experts(x.reshape(-1, 64), 64, moe.config.intermediate_size)
    idx, weight, _ = moe.gate(x)
    tokens = x.reshape(-1, 64)
    grouped = kernels.grouped_experts(moe.experts, moe.act_fn, tokens, idx, weight)
    dense = moe.dense_experts(tokens, idx, weight)
    assert (grouped - dense).abs().max() < 1e-5
    g1 = torch.autograd.grad(grouped.square().sum(), [x] + [e.up_proj.weight for e in moe.experts],
                             retain_graph=True)
    g2 = torch.autograd.grad(dense.square().sum(), [x] + [e.up_proj.weight for e in moe.experts])
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-4


def _gate_with_probabilities(probs, seq_aux, top_k=1):
    """A 2-expert router whose softmax gives exactly `probs` [B, T, 2] (input = log p, weight = I)."""
    config = tiny_config(use_moe=True, n_routed_experts=2, num_experts_per_tok=top_k, seq_aux=seq_aux,
                         hidden_size=2, num_attention_heads=1, num_key_value_heads=1, norm_topk_prob=False)
    gate = MoEGate(config)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(2))
    return gate(torch.tensor(probs).log())


PROBS = [[[0.8, 0.2], [0.6, 0.4]],   # sequence 0 routes both tokens to expert 0
         [[0.3, 0.7], [0.6, 0.4]]]   # sequence 1 routes one token to each expert


def test_moe_aux_loss_sequence_level_hand_worked():
    # f_e = count_e / (T*k/E): seq0 f=[2, 0], P=[0.7, 0.3] -> 1.4;  seq1 f=[1, 1], P=[0.45, 0.55] -> 1.0
    # aux = alpha * mean(1.4, 1.0) = 0.01 * 1.2
    idx, weight, aux = _gate_with_probabilities(PROBS, seq_aux=True)
    assert idx.view(-1).tolist() == [0, 0, 1, 0]
    assert math.isclose(aux.item(), 0.012, rel_tol=1e-5)


def test_moe_aux_loss_batch_level_hand_worked():
    # over all 4 slots: counts [3, 1] -> f = [0.75, 0.25] * E = [1.5, 0.5]; P = [0.575, 0.425]
    # aux = 0.01 * (1.5 * 0.575 + 0.5 * 0.425) = 0.01 * 1.075
    _, _, aux = _gate_with_probabilities(PROBS, seq_aux=False)
    assert math.isclose(aux.item(), 0.01075, rel_tol=1e-5)


def test_moe_top_k_weights_are_renormalised():
    idx, weight, _ = _gate_with_probabilities([[[0.8, 0.2]]], seq_aux=True, top_k=2)
    assert torch.allclose(weight.sum(-1), torch.tensor([1.0]))  # norm_topk_prob is off here, but k = E
    gate = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2).model.layers[0].mlp.gate
    idx, weight, _ = gate(torch.randn(2, 5, 64))
    assert torch.allclose(weight.sum(-1), torch.ones(10), atol=1e-6)


def test_every_expert_that_received_tokens_gets_gradient():
    model = tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=1).train()
    routed = {}  # layer -> experts chosen by its router for positions that carry loss
    for i, layer in enumerate(model.model.layers):
        # the last position has no next token, so its expert output cannot reach the loss
        layer.mlp.gate.register_forward_hook(
            lambda gate, inputs, out, i=i: routed.__setitem__(i, set(out[0].view(1, 4)[:, :-1].reshape(-1).tolist())))
    ids = random_ids(1, 4)  # 3 tokens with loss, top-1 of 4: at least one expert per layer gets nothing
    # CE only: the aux loss reaches every routed position (also the last) through later routers.
    model(ids, labels=ids).loss.backward()
    for i, layer in enumerate(model.model.layers):
        assert len(routed[i]) < 4
        for e, expert in enumerate(layer.mlp.experts):
            grad = expert.down_proj.weight.grad
            assert grad is not None  # idle experts are still in the graph (DDP needs that)
            assert bool(grad.abs().sum() > 0) == (e in routed[i]), f"layer {i} expert {e}"
        assert layer.mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_moe", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_moe):
    """trl / transformers trainers turn checkpointing on by default; recomputing must change nothing."""
    plain = tiny_model(use_moe=use_moe).train()
    checkpointed = tiny_model(use_moe=use_moe).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    ids = random_ids(2, 10)
    losses = []
    for model in (plain, checkpointed):
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        losses.append(out.loss.detach())
    assert torch.allclose(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_moe_ddp_step_with_an_idle_expert(tmp_path, repo_root):
    """Two gloo processes, two tokens each, top-1 of 8 experts: at least four experts get no token."""
    import subprocess
    import sys
    script = f"{repo_root}/tests/ddp_moe_step.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
         str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted(tmp_path.glob("rank*.txt"))
    assert len(reports) == 2
    lines = [p.read_text().split() for p in reports]
    assert lines[0][1] == lines[1][1]                 # same gradient checksum on both ranks after all-reduce
    assert int(lines[0][2]) >= 4                      # experts that got no token on either rank


# --------------------------------------------------------------------------------------------
# YaRN
# --------------------------------------------------------------------------------------------

def test_yarn_changes_exactly_the_frequencies_the_formula_says():
    head_dim, base = 64, 1e6
    plain, _ = rope_inverse_frequencies(head_dim, base, None)
    params = MiniMindConfig(inference_rope_scaling=True).rope_parameters
    scaled, attention_factor = rope_inverse_frequencies(head_dim, base, params)
    # By hand: dim(b) = d * ln(2048 / (2 pi b)) / (2 ln 1e6)
    #   beta_fast = 32 -> 64 * ln(10.186) / 27.631 = 5.38 -> low = floor = 5
    #   beta_slow = 1  -> 64 * ln(325.95) / 27.631 = 13.40 -> high = ceil = 14
    low, high, factor = 5, 14, 16.0
    assert torch.allclose(plain, base ** (-torch.arange(0, 64, 2).double() / 64).float())
    for i in range(head_dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected = plain[i].item() * ((1 - ramp) + ramp / factor)
        assert math.isclose(scaled[i].item(), expected, rel_tol=1e-6), i
    assert torch.equal(scaled[:low + 1], plain[:low + 1])          # fast dimensions untouched
    assert torch.allclose(scaled[high:], plain[high:] / factor)     # slow dimensions interpolated 16x
    assert attention_factor == 1.0
    yarn_model = MiniMindForCausalLM(MiniMindConfig(inference_rope_scaling=True, hidden_size=512,
                                                    max_position_embeddings=64, num_hidden_layers=1))
    angles = torch.outer(torch.arange(64).float(), scaled)
    assert torch.allclose(yarn_model.model.freqs_cos[:, :32], angles.cos(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# transformers / peft integration
# --------------------------------------------------------------------------------------------

def test_registered_with_auto_classes():
    settings = tiny_config().to_dict()
    settings.pop("model_type")
    config = AutoConfig.for_model("minimind", **settings)
    assert isinstance(config, MiniMindConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, MiniMindForCausalLM)


@pytest.mark.parametrize("use_moe", [False, True])
def test_save_pretrained_round_trip(tmp_path, use_moe):
    model = tiny_model(use_moe=use_moe, inference_rope_scaling=use_moe)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MiniMindForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.freqs_cos, model.model.freqs_cos)  # rebuilt, not left uninitialised
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_peft_lora_wraps_and_trains_one_step():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model().train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 12)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(hidden_size=100, num_attention_heads=8), ["hidden_size (100)", "num_attention_heads (8)"]),
    (dict(num_attention_heads=8, num_key_value_heads=3), ["num_key_value_heads (3)", "[1, 2, 4, 8]"]),
    (dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=5), ["num_experts_per_tok (5)", "n_routed_experts (4)"]),
])
def test_inconsistent_config_says_what_to_change(kwargs, words):
    with pytest.raises(ValueError) as err:
        MiniMindConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_wrong_shape_checkpoint_names_key_and_both_shapes():
    small = tiny_model()
    other = tiny_model(hidden_size=128)
    with pytest.raises(ValueError) as err:
        load_state_dict_strict(small, other.state_dict(), source="out/pretrain_128.pth")
    message = str(err.value)
    assert "out/pretrain_128.pth" in message
    assert "shape mismatch for model.embed_tokens.weight: checkpoint [6400, 128] vs model [6400, 64]" in message
    assert "hidden_size=128" in message


def test_strict_loading_never_drops_keys():
    model = tiny_model()
    state = dict(model.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_state_dict_strict(model, state)
    assert "missing key model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unexpected key model.layers.9.extra.weight" in str(err.value)


def test_strict_loading_accepts_ddp_prefix_and_one_tied_name():
    source = tiny_model(seed=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    target = tiny_model(seed=4)
    load_state_dict_strict(target, state)
    ids = random_ids(1, 5)
    with torch.no_grad():
        assert torch.equal(target(ids).logits, source(ids).logits)


def test_cache_must_be_a_cache_object():
    model = tiny_model()
    with pytest.raises(TypeError, match="Cache"):
        model(random_ids(1, 3), past_key_values=[(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(random_ids(1, 3), attention_mask=torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize("use_moe", [False, True])
def test_loss_index_gives_the_same_loss_and_gradients_from_the_loss_positions_only(use_moe):
    """The collator's loss_index: the head runs only where a label counts; the mean CE and every gradient are those
    of the full-logits loss with ignore_index, and lm_head sees exactly the loss positions."""
    from trainer.sampler import collate
    torch.manual_seed(0)
    rows = []
    for length, answer in ((12, 4), (7, 3), (10, 0)):  # the last row: no answer at all (prompt only)
        ids = torch.randint(1, 400, (length,))
        rows.append(dict(input_ids=ids, labels=ids.masked_fill(torch.arange(length) < length - answer, -100)))
    batch = collate(rows)
    assert batch["loss_index"].tolist() == [i for i, label in enumerate(batch["labels"][:, 1:].reshape(-1).tolist())
                                            if label != -100]
    model = tiny_model(use_moe=use_moe).train()
    full = model(batch["input_ids"], labels=batch["labels"])
    full_grads = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1]))
    selected = model(batch["input_ids"], labels=batch["labels"], loss_index=batch["loss_index"])
    hook.remove()
    selected_grads = torch.autograd.grad(selected.loss, list(model.parameters()), allow_unused=True)
    assert selected.logits is None and seen == [torch.Size([len(batch["loss_index"])])]
    torch.testing.assert_close(selected.loss, full.loss)
    for a, b in zip(full_grads, selected_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
