"""Convert MiniMind weights between the native .pth, a transformers model folder, and plain Llama format.

    python scripts/convert_model.py to_transformers out/full_sft_512.pth MiniMind2-Small
    python scripts/convert_model.py to_native MiniMind2-Small out/full_sft_512.pth
    python scripts/convert_model.py to_llama out/full_sft_512.pth MiniMind2-Small-llama
    python scripts/convert_model.py to_qwen3 out/full_sft_768.pth minimind-3-qwen3 --tokenizer_dir minimind-3
    python scripts/convert_model.py to_gguf out/full_sft_512.pth minimind.gguf --outtype q8_0
    python scripts/convert_model.py merge_lora out/full_sft_512.pth out/lora/lora_identity_512.pth out/identity_512.pth
    (any size: depth, width and MoE layout are read off the checkpoint's tensors)

to_transformers: a folder with config.json (model_type "minimind" and an auto_map), model_minimind.py + kernels.py,
    model.safetensors and the tokenizer, for AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
to_native: the half-precision state_dict that --from_weight / eval_llm.py --weight load, with the record of the
    tokenizer the folder ships beside it (NAME.tokenizer.json, common/tokenizer.py).
to_llama: a dense model as transformers' own LlamaForCausalLM (no remote code), which vLLM and other
    transformers-format engines load. MoE models have no Llama equivalent and are refused.
to_qwen3: a minimind-3 weight (dense or MoE) as transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM, the
    format upstream releases minimind-3 in; --tokenizer_dir names the tokenizer it was trained with.
to_gguf: one GGUF file for llama.cpp (llama-cli, llama-server) and Ollama, written with the gguf package: a dense
    MiniMind2 as llama.cpp's llama architecture, minimind-3 as qwen3 and minimind-3-moe as qwen3moe (MiniMind2's MoE
    is refused); the byte-level BPE vocabulary with its merges and pre-tokenizer, the special tokens and the chat
    template (--tokenizer_dir: the tokenizer the weight was trained with); NAME.Modelfile for `ollama create` is
    written beside NAME.gguf.
merge_lora: folds a LoRA file into its base weight (W + s * B A), giving a plain weight every export takes; the
    base's tokenizer record (or the LoRA's) goes with it, and a base and a LoRA recorded with other tokenizers are
    refused.

Every export copies the tokenizer (--tokenizer_dir, default the repository's model/) into what it writes; a .pth
whose record names another tokenizer is refused, saying which one to pass.
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the repository root: the import root

GGUF_OUTTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="direction", required=True)
    for name, source, target in (("to_transformers", "a native .pth", "the model folder to write"),
                                 ("to_llama", "a native .pth of a dense model", "the model folder to write"),
                                 ("to_qwen3", "a native .pth of a minimind-3 model", "the model folder to write"),
                                 ("to_native", "a transformers model folder", "the .pth file to write")):
        command = commands.add_parser(name, help=f"{source} -> {target}")
        command.add_argument("source", help=source)
        command.add_argument("target", help=target)
        command.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
        if name != "to_native":  # a transformers folder ships its own tokenizer
            command.add_argument("--tokenizer_dir", default=None,
                                 help="the tokenizer the weight was trained with (default: the repository's model/)")
    command = commands.add_parser("to_gguf", help="a native .pth of a dense model -> one GGUF file and a Modelfile")
    command.add_argument("source", help="a native .pth of a dense model")
    command.add_argument("target", help="the .gguf file to write (NAME.Modelfile for Ollama is written beside NAME.gguf)")
    command.add_argument("--outtype", default="f16", choices=list(GGUF_OUTTYPES),
                         help="weight type of the 2-D tensors (norms stay f32)")
    command.add_argument("--tokenizer_dir", default=None,
                         help="folder with tokenizer.json and tokenizer_config.json: the tokenizer the weight was "
                              "trained with (default: the repository's model/)")
    command = commands.add_parser("merge_lora", help="a base .pth + a LoRA .pth -> one .pth with the LoRA folded in")
    command.add_argument("source", help="the base weight the LoRA was trained on (a native .pth)")
    command.add_argument("lora", help="the LoRA file (out/lora/*.pth)")
    command.add_argument("target", help="the merged .pth to write")
    command.add_argument("--lora_alpha", type=float, default=None, help="as used in training (default: none)")
    command.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = arguments()  # --help and bad flags are answered here, before torch loads

import torch

from common.files import atomic_torch_save
from common.tokenizer import (PROJECT_TOKENIZER, check_finite, check_recorded, has_tokenizer, load_tokenizer,
                              read_record, tokenizer_fields, write_record)
from model.model_lora import apply_lora, load_lora, lora_layout, merge_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.hf_export import copy_tokenizer, save_llama, save_qwen3
from model.weights import config_from_state_dict, load_state_dict_strict


def load_native(path):
    """A native .pth as a MiniMind model, its config read off the tensor shapes; refused if it holds nan or inf."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MiniMindForCausalLM(config_from_state_dict(state))
    load_state_dict_strict(model, state, source=path)
    check_finite(model, path)
    return model.eval()


def exported_tokenizer(pth, tokenizer_dir=None):
    """The folder of the tokenizer to export with a weight: tokenizer_dir, else model/; refused when the weight's
    record (common/tokenizer.py) names another one. A weight without a record is taken at its word."""
    folder = tokenizer_dir or PROJECT_TOKENIZER
    check_recorded(pth, load_tokenizer(folder), folder, chosen=tokenizer_dir is not None)
    return folder


def to_transformers(pth, out_dir, dtype=torch.float16, tokenizer_dir=None):
    """Native weights -> a transformers folder that carries its own model code (auto_map)."""
    tokenizer_dir = exported_tokenizer(pth, tokenizer_dir)
    model = load_native(pth).to(dtype)
    MiniMindConfig.register_for_auto_class()
    MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(out_dir)  # also copies model/model_minimind.py into the folder
    copy_tokenizer(out_dir, tokenizer_dir)
    return out_dir


def to_native(folder, pth, dtype=torch.float16):
    """A transformers folder -> the (by default half-precision) state_dict MiniMind's scripts load, with the record
    of the tokenizer the folder ships."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    os.makedirs(os.path.dirname(os.path.abspath(pth)), exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    atomic_torch_save(state, pth)
    if has_tokenizer(folder):
        write_record(pth, tokenizer_fields(load_tokenizer(folder), folder), config_from_state_dict(state).generation)
    return pth


def to_llama(pth, out_dir, dtype=torch.float16, tokenizer_dir=None):
    """A dense MiniMind2 as transformers' LlamaForCausalLM (model/hf_export.py)."""
    try:
        return save_llama(load_native(pth), out_dir, exported_tokenizer(pth, tokenizer_dir), dtype)
    except ValueError as e:
        raise SystemExit(f"to_llama: {pth}: {e}")


def to_qwen3(pth, out_dir, dtype=torch.float16, tokenizer_dir=None):
    """A minimind-3 weight as transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM (model/hf_export.py)."""
    try:
        return save_qwen3(load_native(pth), out_dir, exported_tokenizer(pth, tokenizer_dir), dtype)
    except ValueError as e:
        raise SystemExit(f"to_qwen3: {pth}: {e}")


# GGUF keeps 1-D tensors (the RMSNorm weights) in f32 whatever the file type, as llama.cpp's own converter does.
def rope_pairs_interleaved(weight, n_heads):
    """q_proj / k_proj rows reordered for llama.cpp's Llama RoPE, which rotates adjacent pairs (x0, x1), (x2, x3)...
    where MiniMind (like transformers' Llama) rotates (x_i, x_{i + d/2}): within each head, row i of the first half
    and row i of the second half become rows 2i and 2i + 1. Attention scores are unchanged because q and k move alike."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def gguf_vocabulary(tokenizer_dir):
    """(tokens, token types) in id order from tokenizer.json. Byte-level BPE tokens are stored as they are
    written there (bytes mapped to printable characters), which is what llama.cpp's "gpt2" tokenizer model reads.
    Added special tokens (<|im_start|>...) are CONTROL, matched in text only when special tokens are parsed, like
    transformers' special tokens; the other added tokens (<think>, <tool_call>...) are USER_DEFINED, always one token."""
    import json

    import gguf
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise SystemExit(f"{tokenizer_dir}/tokenizer.json: to_gguf handles a byte-level BPE tokenizer whose "
                         f"pre-tokenizer is ByteLevel with its GPT-2 regex (MiniMind's), not {spec['model']['type']} "
                         f"with pre-tokenizer {pre}")
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    return tokens, types


def gguf_tensors(state, config):
    """(name, tensor) pairs to write: the state dict without the tied lm_head (llama.cpp reuses token_embd when
    output is absent) and, for Qwen3-MoE, each layer's experts stacked as llama.cpp reads them: ffn_gate_exps /
    ffn_up_exps [E, I, H] and ffn_down_exps [E, H, I] (GGUF lists dimensions the other way round)."""
    import gguf
    experts = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if ".mlp.experts." in name:  # model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
            _, _, layer, _, _, expert, projection, _ = name.split(".")
            experts.setdefault((int(layer), projection), {})[int(expert)] = tensor
            continue
        yield name, tensor
    kinds = {"gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
             "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP}
    for (layer, projection), by_expert in sorted(experts.items()):
        stacked = torch.stack([by_expert[e] for e in range(config.n_routed_experts)])
        yield gguf.TENSOR_NAMES[kinds[projection]].format(bid=layer) + ".weight", stacked


def ollama_modelfile(gguf_name, tokenizer):
    """An Ollama Modelfile for the GGUF beside it: MiniMind's chat template in Ollama's Go template language
    (ChatML turns; the system prompt through .System, whose default is the template's; tool results as a user
    turn in <tool_response>), and the end-of-turn tokens as stop strings."""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            "{{- range .Messages }}"
            '{{- if eq .Role "user" "assistant" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "tool" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n</tool_response><|im_end|>\n'
            "{{ end }}{{- end }}"
            '<|im_start|>assistant\n"""\n'
            'SYSTEM """You are a helpful assistant"""\n'
            f'PARAMETER stop "{tokenizer.eos_token}"\n'
            f'PARAMETER stop "{tokenizer.pad_token}"\n')


def to_gguf(pth, out_path, outtype="f16", tokenizer_dir=None):
    """Native weights -> one GGUF file plus an Ollama Modelfile beside it: llama.cpp's llama architecture for a
    dense MiniMind2, qwen3 for minimind-3 and qwen3moe for minimind-3-moe (MiniMind2's MoE, with its shared expert,
    has no llama.cpp architecture and is refused).

    llama.cpp identifies a BPE tokenizer's pre-tokenizer by hashing the ids it gives a test string, which a new
    vocabulary like MiniMind's fails; the pre-tokenizer is named here instead: "gpt-2", the regex of a ByteLevel
    pre-tokenizer with use_regex (contractions, letters, digits, other symbols, spaces)."""
    import gguf
    from transformers import AutoTokenizer
    tokenizer_dir = exported_tokenizer(pth, tokenizer_dir)
    model = load_native(pth)
    config = model.config
    if config.use_moe and not config.qk_norm:
        raise SystemExit("to_gguf: a MiniMind2 MoE model (routed + shared experts) has no llama.cpp architecture "
                         "(its Llama export has no experts); use to_transformers for MiniMind2 MoE models")
    # minimind-3 is laid out as Qwen3 / Qwen3-MoE, which llama.cpp runs natively; MiniMind2 as Llama
    arch = (gguf.MODEL_ARCH.QWEN3MOE if config.use_moe else gguf.MODEL_ARCH.QWEN3) if config.qk_norm \
        else gguf.MODEL_ARCH.LLAMA
    if outtype not in GGUF_OUTTYPES:
        raise SystemExit(f"to_gguf: --outtype must be one of {', '.join(GGUF_OUTTYPES)}, not {outtype}")
    quant_name, file_type = GGUF_OUTTYPES[outtype]
    quant = gguf.GGMLQuantizationType[quant_name]
    head_dim = config.head_dim
    tokens, token_types = gguf_vocabulary(tokenizer_dir)
    if len(tokens) != config.vocab_size:
        raise SystemExit(f"to_gguf: {tokenizer_dir}/tokenizer.json has {len(tokens)} tokens, the weight "
                         f"{config.vocab_size} rows of embeddings; pass the tokenizer the model was trained with")

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(os.path.basename(out_path).removesuffix(".gguf"))
        writer.add_file_type(gguf.LlamaFileType[file_type])
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(head_dim)
        if arch != gguf.MODEL_ARCH.LLAMA:  # Qwen3 states its head width (not always hidden / heads)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if arch == gguf.MODEL_ARCH.QWEN3MOE:  # llama.cpp's qwen3moe renormalises the top-k weights, as minimind-3
            writer.add_expert_count(config.n_routed_experts)
            writer.add_expert_used_count(config.num_experts_per_tok)
            writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        # merges, bos/eos/pad/unk ids, add_bos_token false and the chat template, read from the tokenizer files
        gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        for name, tensor in gguf_tensors(model.state_dict(), config):
            data = tensor.float()
            # llama.cpp's llama rotates adjacent pairs; its qwen3 rotates halves (NEOX), as MiniMind does
            if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("self_attn.q_proj.weight"):
                data = rope_pairs_interleaved(data, config.num_attention_heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("self_attn.k_proj.weight"):
                data = rope_pairs_interleaved(data, config.num_key_value_heads)
            data = data.numpy()
            gguf_name = name if name.startswith("blk.") else names.get_name(name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise SystemExit(f"to_gguf: no GGUF name for tensor {name}")
            # q8_0 packs blocks of 32 along a row; a row that does not divide keeps f16, as llama.cpp's converter does
            tensor_quant = quant if data.ndim > 1 else gguf.GGMLQuantizationType.F32
            if tensor_quant == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                tensor_quant = gguf.GGMLQuantizationType.F16
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, tensor_quant), raw_dtype=tensor_quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    modelfile = os.path.splitext(out_path)[0] + ".Modelfile"  # one per GGUF, so several can share a folder
    with open(modelfile, "w", encoding="utf-8") as f:
        f.write(ollama_modelfile(os.path.basename(out_path), tokenizer))
    return out_path


def merge_lora_file(base_pth, lora_pth, out_pth, lora_alpha=None, dtype=torch.float16):
    """Base weight + LoRA file -> one native weight with every adapter folded in (W <- W + s * B A), with the
    tokenizer record of the base (else of the LoRA); a base and a LoRA recorded with other tokenizers are refused."""
    if not os.path.isfile(lora_pth):
        raise SystemExit(f"{lora_pth} does not exist")
    records = [record for record in (read_record(base_pth), read_record(lora_pth)) if record]
    if len({(r["vocab_hash"], r["chat_template_hash"]) for r in records}) > 1:
        base, adapters = records
        raise SystemExit(f"{base_pth} was trained with the tokenizer in {base['tokenizer_dir']} (vocabulary "
                         f"{base['vocab_hash']}, chat template {base['chat_template_hash']}) and {lora_pth} with the "
                         f"one in {adapters['tokenizer_dir']} (vocabulary {adapters['vocab_hash']}, chat template "
                         f"{adapters['chat_template_hash']}): the LoRA was not trained on this base")
    model = load_native(base_pth)
    lora = torch.load(lora_pth, map_location="cpu", weights_only=True)
    rank, targets = lora_layout(lora)  # the rank and target layers are read off the file
    apply_lora(model, rank=rank, alpha=lora_alpha, target_modules=targets)
    load_lora(model, lora)
    merge_lora(model)
    atomic_torch_save({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, out_pth)
    if records:
        write_record(out_pth, records[0], model.config.generation)
    return out_pth


def main(args):
    if args.direction == "to_transformers":
        print(to_transformers(args.source, args.target, getattr(torch, args.dtype), args.tokenizer_dir))
    elif args.direction == "to_llama":
        print(to_llama(args.source, args.target, getattr(torch, args.dtype), args.tokenizer_dir))
    elif args.direction == "to_qwen3":
        print(to_qwen3(args.source, args.target, getattr(torch, args.dtype), args.tokenizer_dir))
    elif args.direction == "to_native":
        print(to_native(args.source, args.target, getattr(torch, args.dtype)))
    elif args.direction == "to_gguf":
        print(to_gguf(args.source, args.target, args.outtype, args.tokenizer_dir))
    else:
        print(merge_lora_file(args.source, args.lora, args.target, args.lora_alpha, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main(args)
