"""A MiniMind model saved as one of transformers' own architectures, the folders GPU engines (vLLM, SGLang) and
transformers load with no remote code: a dense MiniMind2 is a Llama, minimind-3 is a Qwen3 / Qwen3-MoE
(scripts/convert_model.py to_llama / to_qwen3, and the rollout engines' weight syncs, write them).
"""
import os
import shutil

import torch

from model.qwen3_format import qwen3_config, to_qwen3_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(out_dir, tokenizer_dir):
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))


def llama_config(config):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
                       rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                       bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0)


def engine_format(config):
    """"llama" or "qwen3": the architecture a model saves as; ValueError for MiniMind2's MoE, which has neither."""
    if config.generation == "minimind-3":
        return "qwen3"
    if config.use_moe:
        raise ValueError("a MoE MiniMind has no Llama equivalent (Llama has no experts); engines load it only "
                         "through to_transformers (remote code)")
    return "llama"


def save_llama(model, out_dir, tokenizer_dir, dtype=torch.float16):
    """A dense MiniMind2 is a Llama: same names, same maths (pre-norm, RMSNorm, rotate-half RoPE, GQA, SwiGLU)."""
    from transformers import LlamaForCausalLM
    if model.config.generation == "minimind-3":
        raise ValueError("it is a minimind-3 weight, whose per-head q/k norms Llama does not have: save it as Qwen3")
    engine_format(model.config)
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(model.state_dict(), strict=True)
    llama.to(dtype).save_pretrained(out_dir)
    copy_tokenizer(out_dir, tokenizer_dir)
    return out_dir


def save_qwen3(model, out_dir, tokenizer_dir, dtype=torch.float16):
    """A minimind-3 weight is a Qwen3 (or Qwen3-MoE): the format upstream releases minimind-3 in."""
    from transformers import AutoModelForCausalLM
    if model.config.generation != "minimind-3":
        raise ValueError("it is a MiniMind2 weight (no per-head q/k norms): save it as Llama (dense) or to_transformers")
    qwen3 = AutoModelForCausalLM.from_config(qwen3_config(model.config))
    state = {k: v.float() for k, v in model.state_dict().items()}
    qwen3.load_state_dict(to_qwen3_state_dict(state, model.config), strict=True)
    qwen3.to(dtype).save_pretrained(out_dir)
    copy_tokenizer(out_dir, tokenizer_dir)
    return out_dir


def save_for_engines(model, out_dir, tokenizer_dir, dtype=torch.float16):
    """The model in the architecture engines load natively for its generation (engine_format)."""
    save = save_qwen3 if engine_format(model.config) == "qwen3" else save_llama
    return save(model, out_dir, tokenizer_dir, dtype)
