"""MiniMind: a small Llama-style decoder, dense or mixture-of-experts.

Architecture (pre-norm, as in Llama / Qwen):
    h = x + Attention(RMSNorm(x))          # GQA, rotary positions (RoPE, optional YaRN)
    y = h + FeedForward(RMSNorm(h))        # SwiGLU, or a routed MoE of SwiGLU experts
    logits = lm_head(RMSNorm(y_last))      # lm_head shares the embedding matrix

Parameter names follow Llama's, so a dense checkpoint loads into `transformers.LlamaForCausalLM`.
The classes plug into transformers: `generate()` with its Cache objects, `save_pretrained` /
`from_pretrained`, AutoConfig / AutoModelForCausalLM and peft all work on them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

# Which torch kernel a device gets for attention and the experts, and why. A relative import, so that transformers'
# save_pretrained copies kernels.py beside this file into an exported (trust_remote_code) model folder.
from .kernels import (additive_mask, attention as fast_attention, can_group_experts, compute_dtype, grouped_experts,
                      packed_rows)


# The two generations of MiniMind. MiniMind2 (2025): 2 key-value heads, SwiGLU width 8/3 of the hidden size,
# MoE with a shared expert and a per-sequence balance loss. minimind-3 (2026, Qwen3's layout): an RMSNorm on each
# query and key head before RoPE, 4 key-value heads, width pi times the hidden size, MoE of 4 routed experts with
# top-1 routing and a batch-level balance loss. The values a config takes unless it sets them:
GENERATIONS = {
    "minimind2": dict(num_key_value_heads=2, rms_norm_eps=1e-5, qk_norm=False, num_experts_per_tok=2,
                      n_shared_experts=1, aux_loss_alpha=0.01, seq_aux=True, width=lambda h: int(h * 8 / 3)),
    "minimind-3": dict(num_key_value_heads=4, rms_norm_eps=1e-6, qk_norm=True, num_experts_per_tok=1,
                       n_shared_experts=0, aux_loss_alpha=5e-4, seq_aux=False, width=lambda h: h * math.pi),
}


class MiniMindConfig(PretrainedConfig):
    """Hyper-parameters of a MiniMind model. Defaults are MiniMind2-Small (512 hidden x 8 layers);
    generation="minimind-3" gives that generation's defaults (GENERATIONS) for whatever is not set."""

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int | None = None,
        vocab_size: int = 6400,
        rms_norm_eps: float | None = None,
        rope_theta: float = 1e6,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        generation: str = "minimind2",
        head_dim: int | None = None,
        qk_norm: bool | None = None,
        # mixture of experts
        use_moe: bool = False,
        num_experts_per_tok: int | None = None,
        n_routed_experts: int = 4,
        n_shared_experts: int | None = None,
        scoring_func: str = "softmax",
        aux_loss_alpha: float | None = None,
        seq_aux: bool | None = None,
        norm_topk_prob: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        # MiniMind2 config files carry `rope_scaling`; here it is derived from inference_rope_scaling.
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_parameters", None)
        if generation not in GENERATIONS:
            raise ValueError(f"generation {generation!r} is unknown; use one of {sorted(GENERATIONS)}")
        defaults = GENERATIONS[generation]
        self.generation = generation
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        # SwiGLU width, rounded up to a multiple of 64: 8/3 of the hidden size in MiniMind2 (512 -> 1408),
        # pi times it in minimind-3 (768 -> 2432).
        self.intermediate_size = intermediate_size or 64 * math.ceil(defaults["width"](hidden_size) / 64)
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_key_value_heads or defaults["num_key_value_heads"]
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.qk_norm = defaults["qk_norm"] if qk_norm is None else qk_norm
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps or defaults["rms_norm_eps"]
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        # Static YaRN: stretch a model trained at 2048 positions 16x at inference time.
        self.rope_parameters = (
            dict(rope_type="yarn", rope_theta=rope_theta, factor=16.0, original_max_position_embeddings=2048,
                 beta_fast=32.0, beta_slow=1.0, attention_factor=1.0)
            if inference_rope_scaling else dict(rope_type="default", rope_theta=rope_theta))
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok or defaults["num_experts_per_tok"]
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = defaults["n_shared_experts"] if n_shared_experts is None else n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = defaults["aux_loss_alpha"] if aux_loss_alpha is None else aux_loss_alpha
        self.seq_aux = defaults["seq_aux"] if seq_aux is None else seq_aux
        self.norm_topk_prob = norm_topk_prob
        self.tie_word_embeddings = tie_word_embeddings
        self._check_consistency()
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def _check_consistency(self):
        if self.hidden_size % self.num_attention_heads and self.head_dim == self.hidden_size // self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): change one of them, e.g. num_attention_heads="
                f"{_largest_divisor_at_most(self.hidden_size, self.num_attention_heads)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention: change num_key_value_heads to one of "
                f"{[d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]}.")
        if self.head_dim % 2:
            raise ValueError(
                f"head size head_dim = {self.head_dim} (default hidden_size/num_attention_heads) "
                "must be even for rotary embeddings: change hidden_size, num_attention_heads or head_dim.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is unknown; use one of {sorted(ACT2FN)[:8]}...")
        if self.use_moe:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and n_routed_experts "
                    f"({self.n_routed_experts}): lower num_experts_per_tok or raise n_routed_experts.")
            if self.scoring_func != "softmax":
                raise ValueError(f"scoring_func {self.scoring_func!r} is not supported; use 'softmax'.")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019): y = w * x / sqrt(mean(x^2) + eps), in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, rope_theta: float, rope_parameters: dict | None = None):
    """RoPE frequencies theta_i = base^(-2i/d) (Su et al., 2021), optionally rescaled by static YaRN.

    YaRN (Peng et al., 2023): with ramp gamma_i in [0, 1] between the beta_fast and beta_slow dimensions,
    theta'_i = theta_i * ((1 - gamma_i) + gamma_i / factor): fast-rotating dimensions keep their frequency,
    slow ones are interpolated by `factor`. Returns (inverse frequencies [head_dim/2], attention factor).
    """
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    params = rope_parameters or {}
    if params.get("rope_type") != "yarn":
        return inv_freq, 1.0
    factor, original_max = params["factor"], params["original_max_position_embeddings"]

    def dim_of_rotations(num_rotations):  # the dimension index that turns num_rotations times over original_max
        return head_dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

    low = max(math.floor(dim_of_rotations(params["beta_fast"])), 0)
    high = min(math.ceil(dim_of_rotations(params["beta_slow"])), head_dim // 2 - 1)
    ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 1e-3)).clamp(0, 1)
    return inv_freq * (1 - ramp + ramp / factor), params.get("attention_factor", 1.0)


def rope_tables(config: MiniMindConfig):
    """cos / sin tables [max_position_embeddings, head_dim] in the rotate-half layout (both halves equal)."""
    inv_freq, attention_factor = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_parameters)
    angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(q, k, cos, sin):
    """Rotate query/key pairs (i, i + d/2) by the position angle: x * cos + rotate_half(x) * sin."""
    return (q * cos + rotate_half(q) * sin).to(q.dtype), (k * cos + rotate_half(k) * sin).to(k.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA, Ainslie et al., 2023) and a KV cache.
    minimind-3 (config.qk_norm) normalises each query and key head with an RMSNorm before RoPE (QK-norm, as in
    Qwen3), which keeps the attention logits bounded."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.use_sdpa = config.flash_attn

    def forward(self, x, cos, sin, attn_mask=None, past_key_values: Cache | None = None, documents=None):
        """x [B, T, H]; attn_mask None (plain causal) or the additive bias [B|1, 1, T, T_past + T] (0 = may attend,
        -inf = may not; kernels.additive_mask);
        documents: (cu_seqlens, longest) of packed rows for varlen flash attention (see kernels.packed_rows)."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            # RMSNorm's fp32 weight times its bf16 output is fp32 under autocast: back to v's (the matmuls') dtype,
            # so attention gets one dtype (flash and varlen refuse fp32 or mixed) and the KV cache stays half size
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        past_len = 0
        if past_key_values is not None:
            past_len = past_key_values.get_seq_length(self.layer_idx)
            k, v = past_key_values.update(k, v, self.layer_idx)  # prepend cached keys/values
        dropout_p = self.dropout if self.training else 0.0
        # With no mask, queries are the last rows of the causal square: is_causal for a fresh sequence, and nothing
        # to mask for a single new token after the cache (the model passes a mask in every other case). Decided by
        # the cache, not by seq_len > 1: under torch.compile's dynamic shapes that is a SymBool, which SDPA refuses.
        is_causal = attn_mask is None and past_len == 0
        if self.use_sdpa or documents is not None:  # SDPA's flash / memory-efficient kernels, or varlen flash
            out = fast_attention(q, k, v, attn_mask, dropout_p, is_causal, documents)
        else:  # the same computation written out: softmax(q k^T / sqrt(d) + mask) v
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if is_causal:
                attn_mask = additive_mask(torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril(),
                                          scores.dtype)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = F.dropout(scores.float().softmax(dim=-1).type_as(q), p=dropout_p, training=self.training)
            out = probs @ v
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.resid_dropout(self.o_proj(out))


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): down(act(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    """Softmax router choosing the top-k experts per token, with the load-balancing auxiliary loss.

    aux = alpha * sum_e f_e * P_e (Switch Transformer / DeepSeekMoE), where P_e is the mean router
    probability of expert e and f_e the share of routed slots that went to e, scaled so that a uniform
    load gives f_e = 1. With seq_aux both are taken per sequence and the loss is averaged over the batch.
    minimind-3 (Qwen3-MoE style) renormalises the top-k weights even for k = 1 (each token's weight is then 1)
    and counts f_e per token over the whole batch (the sum of its k slots: k times the share of slots).
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        qwen3_style = config.generation == "minimind-3"
        # MiniMind2 renormalises only for k > 1 (at k = 1 a token keeps its router probability)
        self.renormalise = config.norm_topk_prob and (self.top_k > 1 or qwen3_style)
        self.slots_per_token = self.top_k if qwen3_style else 1
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))

    def forward(self, x):
        """x [B, T, H] -> expert ids [B*T, k], their weights [B*T, k], aux loss (scalar tensor)."""
        batch, seq_len, hidden = x.shape
        scores = F.linear(x.reshape(-1, hidden), self.weight).float().softmax(dim=-1)  # [N, E]
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, self.aux_loss(scores, topk_idx, batch, seq_len)

    def aux_loss(self, scores, topk_idx, batch, seq_len):
        if self.alpha <= 0:
            return scores.new_zeros(())
        num_experts = self.n_routed_experts
        # slot_counts[b, e]: how many of sequence b's routed slots chose expert e (no host sync).
        chosen = F.one_hot(topk_idx.view(batch, seq_len * self.top_k), num_experts).float()
        if self.seq_aux:
            load = chosen.sum(dim=1) / (seq_len * self.top_k / num_experts)   # f [B, E]
            importance = scores.view(batch, seq_len, num_experts).mean(dim=1)  # P [B, E]
            return (load * importance).sum(dim=1).mean() * self.alpha
        load = chosen.view(-1, num_experts).mean(dim=0) * num_experts * self.slots_per_token  # f [E]
        return (load * scores.mean(dim=0)).sum() * self.alpha


class MOEFeedForward(nn.Module):
    """Mixture of SwiGLU experts: each token goes to its top-k routed experts, plus the shared experts.

    Dispatch never syncs with the host, and train and eval mode take the same path: one grouped matmul per
    projection over the slots sorted by expert where the device has the kernel (kernels.grouped_experts), else
    every expert on every token, weighted 0 where not routed (dense_experts).
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        batch, seq_len, hidden = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        tokens = x.reshape(-1, hidden)
        # Expert dropout only exists on the per-expert path, and so do LoRA adapters on the experts: the grouped
        # kernel reads each expert's weight directly, so their forward hooks would never run (no gradient).
        if can_group_experts(tokens, self.config.hidden_size, self.config.intermediate_size) and \
                not (self.training and self.config.dropout > 0) and not self.experts_have_adapters():
            routed = grouped_experts(self.experts, self.act_fn, tokens, topk_idx, topk_weight)
        else:
            routed = self.dense_experts(tokens, topk_idx, topk_weight)
        out = routed.view(batch, seq_len, hidden)
        for expert in self.shared_experts:
            out = out + expert(x)
        return out

    def experts_have_adapters(self):
        return any(hasattr(linear, "lora") for linear in self.experts.modules())

    def dense_experts(self, tokens, topk_idx, topk_weight):
        """sum_k weight_k * expert_k(token), written out: every expert sees every token, weighted 0 where not routed.

        Costs n_routed_experts / top_k times the routed compute but still never syncs with the host.
        """
        out = 0
        for e, expert in enumerate(self.experts):
            weight = (topk_weight * (topk_idx == e)).sum(dim=-1, keepdim=True)  # [N, 1]
            out = out + expert(tokens) * weight.to(tokens.dtype)
        return out


class MiniMindBlock(GradientCheckpointingLayer):
    """Pre-norm decoder layer. As a GradientCheckpointingLayer it recomputes its activations in the
    backward pass after model.gradient_checkpointing_enable() (memory for compute; off by default)."""

    def __init__(self, layer_idx: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, attn_mask=None, past_key_values=None, documents=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values, documents)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    """The decoder stack's output plus the MoE load-balancing loss (a zero tensor for dense models)."""
    aux_loss: torch.Tensor | None = None


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """N(0, 0.02) for linear / embedding / router weights, ones for norms, and the RoPE tables."""
        super()._init_weights(module)  # Linear, Embedding (std = config.initializer_range or 0.02), RMSNorm
        if isinstance(module, MoEGate):
            init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, MiniMindModel):  # non-persistent buffers are rebuilt, never loaded
            cos, sin = rope_tables(self.config)
            init.copy_(module.freqs_cos, cos)
            init.copy_(module.freqs_sin, sin)


class MiniMindModel(MiniMindPreTrainedModel):
    """The decoder stack without the language-model head."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        freqs_cos, freqs_sin = rope_tables(config)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, inputs_embeds=None, output_hidden_states=False, documents=None, **kwargs):
        """Returns last_hidden_state [B, T, H], past_key_values (cache or None), aux_loss (MoE load
        balance, 0 for dense) and hidden_states (all layers, when asked), as transformers' base models do.

        attention_mask [B, T_past + T] (1 = token, 0 = padding) covers the cached tokens too, as in
        transformers' generate(). position_ids default to the cache offset + 0..T-1.
        Packed rows (several documents back to back, as with transformers' DataCollatorWithFlattening): pass
        position_ids that restart at 0 where each document starts, and no attention_mask and no cache;
        attention then stays inside each document, so every token gets what it would get alone. documents: the
        collator's (cu_seqlens, longest) of those rows (trainer.sampler.collate), so that the GPU's varlen path
        reads nothing back from the device.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), "
                            f"not {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq_len = hidden.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        # Packed rows: some row's positions restart at 0 inside it. A row whose positions run on without a
        # restart is one document, served exactly by plain causal attention - as at every prefill of
        # generate(), which passes positions and drops an all-ones mask. (One host read of the flag, unless the
        # collator's documents say so.)
        packed = (position_ids is not None and attention_mask is None and past_len == 0 and seq_len > 1
                  and (documents is not None or bool((position_ids[:, 1:] == 0).any())))
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=hidden.device).unsqueeze(0)
        cos = self.freqs_cos[position_ids].unsqueeze(1).to(hidden.dtype)  # [B|1, 1, T, head_dim]
        sin = self.freqs_sin[position_ids].unsqueeze(1).to(hidden.dtype)
        if packed:  # attention kept inside each document: varlen flash attention or a block-diagonal mask
            attn_mask, documents = packed_rows(position_ids.expand(batch, seq_len), hidden,
                                               dropout=self.training and self.config.dropout, documents=documents)
        else:
            attn_mask, documents = self._attention_mask(attention_mask, batch, seq_len, past_len, hidden.device), None
        if attn_mask is not None:  # one additive bias for all layers, in the dtype the attention runs in
            attn_mask = additive_mask(attn_mask, compute_dtype(hidden))

        hidden = self.dropout(hidden)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn_mask, past_key_values=past_key_values, documents=documents)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden
        aux_loss = sum((layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MOEFeedForward)),
                       hidden.new_zeros((), dtype=torch.float32))
        return MiniMindModelOutput(last_hidden_state=hidden, aux_loss=aux_loss,
                                   past_key_values=past_key_values if use_cache or past_key_values is not None else None,
                                   hidden_states=tuple(all_hidden) if all_hidden else None)

    @staticmethod
    def _attention_mask(attention_mask, batch, seq_len, past_len, device):
        """None when plain causal attention is exact (no padding; fresh sequence or one new token),
        else a bool mask [B|1, 1, T, T_past + T] combining causality with the padding mask."""
        total_len = past_len + seq_len
        if attention_mask is None and (past_len == 0 or seq_len == 1):
            return None
        query_pos = torch.arange(past_len, total_len, device=device)
        key_pos = torch.arange(total_len, device=device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]      # causal, offset by the cache
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, total_len):
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = [{batch}, {total_len}], "
                    f"got {list(attention_mask.shape)}")
            mask = mask & attention_mask[:, None, None, :].bool()
            # A padding query sees no key at all; let it see everything so softmax stays finite.
            # Its output is never used (it is padding), but NaNs would leak into gradients.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with a tied language-model head; `forward(labels=...)` gives the next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head.weight to model.embed_tokens.weight (config.tie_word_embeddings)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep: int | torch.Tensor = 0, inputs_embeds=None,
                output_hidden_states=False, loss_index: torch.Tensor | None = None, **kwargs):
        """labels [B, T]: token ids, -100 where no loss; loss = mean CE of logits[:, t] vs labels[:, t+1].
        documents: packed rows' (cu_seqlens, longest) from the collator (see MiniMindModel.forward).

        logits_to_keep: an int n keeps the last n positions (0 = all), a tensor selects positions.
        loss_index: the flat positions t of [B, T - 1] whose label t + 1 is not -100 (the collator's
        batch["loss_index"], found on the CPU): the head runs at those positions only. With labels: the same mean
        CE, and logits is None; without: logits [K, V] at the K positions, for a loss the caller computes (DPO,
        distillation). SFT trains on the answers, often under a third of the tokens, and the 6400-wide head is about
        40% of a 192-wide model's matmul work.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=bool(use_cache), inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, documents=kwargs.get("documents"))
        if loss_index is not None:
            hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.size(-1))
            loss_index = loss_index.to(hidden.device)
            logits = self.lm_head(hidden.index_select(0, loss_index))  # [K, V]
            loss = None
            if labels is not None:
                targets = labels[:, 1:].reshape(-1).to(hidden.device).index_select(0, loss_index)
                loss, logits = F.cross_entropy(logits.float(), targets), None
            return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=logits,
                                             past_key_values=out.past_key_values, hidden_states=out.hidden_states)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position: leave logits_to_keep at 0")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=logits,
                                         past_key_values=out.past_key_values, hidden_states=out.hidden_states)


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
