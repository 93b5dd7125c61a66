"""minimind-3 in transformers' Qwen3 format, both ways: upstream releases minimind-3 as a Qwen3ForCausalLM /
Qwen3MoeForCausalLM folder, and the same weights give the same logits in MiniMindForCausalLM
(tests/test_minimind3.py). The dense layout has the same parameter names; Qwen3-MoE (transformers 5) stacks each
layer's experts in memory: gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I]. On disk a
Qwen3-MoE folder keeps one tensor per expert (mlp.experts.{e}.gate_proj.weight ...), MiniMind's own names:
transformers' save_pretrained writes that layout and converts it back when loading.
"""
import json
import os

import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import load_state_dict_strict

QWEN3_TYPES = ("qwen3", "qwen3_moe")


def qwen3_config(config):
    """The transformers Qwen3 (dense) or Qwen3-MoE config of a minimind-3 MiniMindConfig."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, hidden_act=config.hidden_act,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0)
    if not config.use_moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(**common, num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                          moe_intermediate_size=config.intermediate_size, norm_topk_prob=config.norm_topk_prob,
                          decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.aux_loss_alpha)


def to_qwen3_state_dict(state, config):
    """minimind-3 weights under Qwen3's names: the dense layout is the same; Qwen3-MoE (transformers 5) stores each
    layer's experts stacked, gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I]."""
    if not config.use_moe:
        return dict(state)
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config.n_routed_experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([state[f"{prefix}.{e}.gate_proj.weight"],
                                                                state[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
        out[f"{prefix}.down_proj"] = torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    return out


def from_qwen3_state_dict(state, config):
    """The inverse of to_qwen3_state_dict: stacked experts back to one module per expert (a state dict read from
    a folder's files already has them so)."""
    if not config.use_moe or "model.layers.0.mlp.experts.gate_up_proj" not in state:
        return dict(state)
    out = {k: v for k, v in state.items() if not k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))}
    size = config.intermediate_size
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        for e in range(config.n_routed_experts):
            gate_up = state[f"{prefix}.gate_up_proj"][e]
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate_up[:size], gate_up[size:]
            out[f"{prefix}.{e}.down_proj.weight"] = state[f"{prefix}.down_proj"][e]
    return out


def is_qwen3_folder(folder):
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type") in QWEN3_TYPES


def load_qwen3_folder(folder, **overrides):
    """A Qwen3 / Qwen3-MoE folder (a released minimind-3 model) as a MiniMindForCausalLM in fp32."""
    from transformers import AutoConfig
    from safetensors.torch import load_file
    qwen3 = AutoConfig.from_pretrained(folder)
    moe = qwen3.model_type == "qwen3_moe"
    rope_theta = (getattr(qwen3, "rope_parameters", None) or {}).get("rope_theta") or getattr(qwen3, "rope_theta", 1e6)
    config = MiniMindConfig(generation="minimind-3", hidden_size=qwen3.hidden_size,
                            num_hidden_layers=qwen3.num_hidden_layers, vocab_size=qwen3.vocab_size,
                            num_attention_heads=qwen3.num_attention_heads, num_key_value_heads=qwen3.num_key_value_heads,
                            head_dim=qwen3.head_dim, rms_norm_eps=qwen3.rms_norm_eps, rope_theta=rope_theta,
                            max_position_embeddings=qwen3.max_position_embeddings,
                            intermediate_size=qwen3.moe_intermediate_size if moe else qwen3.intermediate_size,
                            use_moe=moe, n_routed_experts=qwen3.num_experts if moe else 4,
                            num_experts_per_tok=qwen3.num_experts_per_tok if moe else None, **overrides)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"{folder}: a Qwen3 folder needs its *.safetensors weights")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    model = MiniMindForCausalLM(config)
    load_state_dict_strict(model, {k: v.float() for k, v in from_qwen3_state_dict(state, config).items()},
                           source=folder)
    return model


def read_weights(path):
    """The state dict (this project's parameter names) of a weight in any form it comes in: a native .pth file,
    a released minimind-3 Qwen3 / Qwen3-MoE folder, or a transformers MiniMind folder (convert_model.py
    to_transformers). Only tensors are read: torch.load with weights_only, or safetensors."""
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    if not os.path.isdir(path):
        raise SystemExit(f"{path}: no such weight file or model folder")
    if is_qwen3_folder(path):
        return load_qwen3_folder(path).state_dict()
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not os.path.isfile(os.path.join(path, "config.json")) or not files:
        raise SystemExit(f"{path}: a model folder needs config.json and *.safetensors weights "
                         "(scripts/convert_model.py writes them)")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state
