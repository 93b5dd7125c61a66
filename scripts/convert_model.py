"""Convert MiniMind weights between the native .pth, a transformers model folder, and plain Llama format.

    python scripts/convert_model.py to_transformers out/full_sft_512.pth MiniMind2-Small
    python scripts/convert_model.py to_native MiniMind2-Small out/full_sft_512.pth
    python scripts/convert_model.py to_llama out/full_sft_512.pth MiniMind2-Small-llama
    (any size: depth, width and MoE layout are read off the checkpoint's tensors)

to_transformers: a folder with config.json (model_type "minimind" and an auto_map), model_minimind.py,
    model.safetensors and the tokenizer, for AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
to_native: the half-precision state_dict that --from_weight / eval_llm.py --weight load.
to_llama: a dense model as transformers' own LlamaForCausalLM (no remote code), which llama.cpp, vLLM
    and Ollama understand. MoE models have no Llama equivalent and are refused.
"""
import argparse
import os
import shutil
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from model.model_lora import atomic_torch_save  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_state_dict_strict  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
from chat_core import config_from_state_dict  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_native(path):
    """A native .pth as a MiniMind model, its config read off the tensor shapes."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MiniMindForCausalLM(config_from_state_dict(state))
    load_state_dict_strict(model, state, source=path)
    return model.eval()


def copy_tokenizer(out_dir):
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(REPO_ROOT, "model", name), os.path.join(out_dir, name))


def to_transformers(pth, out_dir, dtype=torch.float16):
    """Native weights -> a transformers folder that carries its own model code (auto_map)."""
    model = load_native(pth).to(dtype)
    MiniMindConfig.register_for_auto_class()
    MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(out_dir)  # also copies model/model_minimind.py into the folder
    copy_tokenizer(out_dir)
    return out_dir


def to_native(folder, pth):
    """A transformers folder -> the half-precision state_dict MiniMind's scripts load."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    os.makedirs(os.path.dirname(os.path.abspath(pth)), exist_ok=True)
    atomic_torch_save({k: v.detach().half().cpu() for k, v in model.state_dict().items()}, pth)
    return pth


def llama_config(config):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
                       rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                       bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0)


def to_llama(pth, out_dir, dtype=torch.float16):
    """A dense MiniMind is a Llama: same names, same maths (pre-norm, RMSNorm, rotate-half RoPE, GQA, SwiGLU)."""
    from transformers import LlamaForCausalLM
    model = load_native(pth)
    if model.config.use_moe:
        raise SystemExit("to_llama: a MoE MiniMind has no Llama equivalent (Llama has no experts); "
                         "use to_transformers for MoE models")
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(model.state_dict(), strict=True)
    llama.to(dtype).save_pretrained(out_dir)
    copy_tokenizer(out_dir)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to_transformers", "to_native", "to_llama"])
    parser.add_argument("source", help="a .pth file (to_transformers, to_llama) or a model folder (to_native)")
    parser.add_argument("target", help="the folder (to_transformers, to_llama) or .pth file (to_native) to write")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.direction == "to_transformers":
        print(to_transformers(args.source, args.target, dtype))
    elif args.direction == "to_llama":
        print(to_llama(args.source, args.target, dtype))
    else:
        print(to_native(args.source, args.target))


if __name__ == "__main__":
    main()
