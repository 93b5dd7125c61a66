"""Reading a native MiniMind checkpoint: its config, off the tensors' names and shapes, and a strict load that names
every key that does not fit. Shared by the trainers (--from_weight), the chat/serving code and the converters."""
from torch import nn

from model.model_minimind import MiniMindConfig


def config_from_state_dict(state, **overrides):
    """The MiniMindConfig of a native checkpoint, read off its keys and shapes, never its file name (MiniMind2
    768x16 and minimind-3 768x8 both save as *_768.pth). minimind-3 has per-head q/k norms (self_attn.q_norm
    [head_dim]), from which its head count follows; MiniMind2's shapes cannot show its 8 query heads."""
    state = without_wrapper_prefixes(state)
    embed = state["model.embed_tokens.weight"]
    hidden = embed.shape[1]
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else hidden // MiniMindConfig().num_attention_heads
    experts = {k.split(".")[5] for k in state if ".mlp.experts." in k}
    shared = {k.split(".")[5] for k in state if ".mlp.shared_experts." in k}
    up = next(v for k, v in state.items() if k.endswith("up_proj.weight"))
    return MiniMindConfig(generation="minimind-3" if q_norm is not None else "minimind2", hidden_size=hidden,
                          num_hidden_layers=layers, vocab_size=embed.shape[0], intermediate_size=up.shape[0],
                          head_dim=head_dim,
                          num_attention_heads=state["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                          num_key_value_heads=state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                          use_moe=bool(experts), n_routed_experts=len(experts) or 4,
                          n_shared_experts=len(shared) if experts else None, **overrides)


def without_wrapper_prefixes(state_dict: dict) -> dict:
    """The state dict with the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes taken off its keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str = "checkpoint"):
    """Load weights, failing loudly: every missing, unexpected or mis-shaped key is named.

    Accepts the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes. Tied weights may appear
    under either or both names. `source` names the file in the error message.
    """
    cleaned = without_wrapper_prefixes(state_dict)
    expected = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied weights: a checkpoint holding the matrix under either name is complete.
        for name, twin in (("lm_head.weight", "model.embed_tokens.weight"),
                           ("model.embed_tokens.weight", "lm_head.weight")):
            if name in cleaned and twin not in cleaned and twin in expected:
                cleaned[twin] = cleaned[name]
    problems = []
    for key in sorted(expected.keys() - cleaned.keys()):
        problems.append(f"missing key {key} (model shape {list(expected[key].shape)})")
    for key in sorted(cleaned.keys() - expected.keys()):
        problems.append(f"unexpected key {key} (checkpoint shape {list(cleaned[key].shape)})")
    for key in sorted(expected.keys() & cleaned.keys()):
        if tuple(expected[key].shape) != tuple(cleaned[key].shape):
            problems.append(f"shape mismatch for {key}: checkpoint {list(cleaned[key].shape)} "
                            f"vs model {list(expected[key].shape)}")
    if problems:
        hint = ""
        embed = cleaned.get("model.embed_tokens.weight")
        if embed is not None and embed.dim() == 2:
            layers = len({k.split(".")[2] for k in cleaned if k.startswith("model.layers.")})
            moe = any(".mlp.experts." in k for k in cleaned)
            hint = (f"\nThe checkpoint looks like hidden_size={embed.shape[1]}, num_hidden_layers={layers}, "
                    f"use_moe={int(moe)}, vocab_size={embed.shape[0]}; the model is hidden_size="
                    f"{model.config.hidden_size}, num_hidden_layers={model.config.num_hidden_layers}, "
                    f"use_moe={int(model.config.use_moe)}.")
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{source} does not fit the model:\n  {shown}{hint}")
    model.load_state_dict(cleaned, strict=True)
    return model
