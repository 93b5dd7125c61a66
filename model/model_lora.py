"""LoRA, written from scratch (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer W gets a trainable low-rank update:  y = W x + s * B (A x),
A: [r, in] ~ N(0, 0.02), B: [out, r] = 0 (so training starts from the base model), s = alpha / r,
or s = 1 when alpha is not given (MiniMind's behaviour). Tensors are stored as
`<linear>.lora.A.weight` / `<linear>.lora.B.weight`, the names MiniMind uses.
"""
import torch
from torch import nn

from common.files import atomic_torch_save


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.rank = rank
        self.scaling = 1.0 if alpha is None else alpha / rank
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.A.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.B(self.A(x)) * self.scaling


def _add_lora_output(linear: nn.Linear, inputs, output):
    """Forward hook on an adapted Linear: W x (its own output) + its LoRA branch on the same input."""
    return output + linear.lora(inputs[0])


def is_square_linear(module: nn.Module) -> bool:
    """MiniMind's default target: every square Linear (q_proj and o_proj in MiniMind models)."""
    return isinstance(module, nn.Linear) and module.weight.shape[0] == module.weight.shape[1]


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
               target_modules: list[str] | None = None, freeze_base: bool = True) -> int:
    """Attach a LoRA branch to the chosen Linear layers and return the number of LoRA parameters.

    target_modules: None for every square Linear, or names to match against the end of the module
    path (e.g. ["q_proj", "v_proj"]). freeze_base leaves only LoRA parameters trainable.
    """
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_modules is None:
            selected = is_square_linear(module)
        else:
            selected = any(name == t or name.endswith("." + t) for t in target_modules)
        if selected:
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"apply_lora found no Linear layer matching {target_modules or 'square Linears'}")
    for name, module in chosen:
        if hasattr(module, "lora"):
            raise ValueError(f"{name} already has a LoRA adapter; merge or reload the model first")
        lora = LoRA(module.in_features, module.out_features, rank, alpha)
        module.add_module("lora", lora.to(device=module.weight.device, dtype=module.weight.dtype))
        # A hook (not a replaced forward) survives copy.deepcopy and torch.compile.
        module.register_forward_hook(_add_lora_output)
    if freeze_base:
        for name, param in model.named_parameters():
            param.requires_grad = ".lora." in name
    return sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)


def _strip_wrapper_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        key = key.removeprefix(prefix)
    return key


def lora_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict:
    """Only the LoRA tensors, on CPU, with wrapper prefixes removed."""
    return {_strip_wrapper_prefixes(k): v.detach().to("cpu", dtype)
            for k, v in model.state_dict().items() if ".lora." in k}


def save_lora(model: nn.Module, path: str, dtype: torch.dtype = torch.float16) -> None:
    """Write the LoRA tensors (half precision by default) atomically: temp file, then rename."""
    state = lora_state_dict(model, dtype)
    if not state:
        raise ValueError("the model has no LoRA layers to save; call apply_lora first")
    atomic_torch_save(state, path)


def load_lora(model: nn.Module, path_or_state) -> None:
    """Load LoRA tensors into a model that already went through apply_lora with the same targets.

    Accepts a path or a state dict, with or without the DDP `module.` prefix. Every adapter must be
    found in the file and every tensor in the file must have a home with the same shape.
    """
    source = path_or_state if isinstance(path_or_state, str) else "LoRA state dict"
    state = (torch.load(path_or_state, map_location="cpu", weights_only=True)
             if isinstance(path_or_state, str) else path_or_state)
    state = {_strip_wrapper_prefixes(k): v for k, v in state.items()}
    expected = {_strip_wrapper_prefixes(k): v for k, v in model.state_dict().items() if ".lora." in k}
    if not expected:
        raise ValueError(f"cannot load {source}: the model has no LoRA layers; call apply_lora first")
    problems = [f"missing {k}" for k in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - expected.keys())]
    problems += [f"shape mismatch for {k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
                 for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if problems:
        raise ValueError(f"{source} does not match the model's LoRA layers (rank or targets differ?):\n  "
                         + "\n  ".join(problems[:20]))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            key = _strip_wrapper_prefixes(name)
            if key in state:
                tensor.copy_(state[key])


def lora_layout(state: dict) -> tuple[int, list[str]]:
    """(rank, target Linear names) of a saved LoRA state, read from its tensor names and shapes,
    so a file can be applied without being told how it was trained."""
    targets = sorted({k.split(".lora.")[0].rsplit(".", 1)[-1] for k in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight"))
    return rank, targets


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W <- W + s * B A) and remove it. Returns how many."""
    merged = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora"):
            lora = module.lora
            with torch.no_grad():
                delta = (lora.B.weight.float() @ lora.A.weight.float()) * lora.scaling
                module.weight += delta.to(module.weight.dtype)
            for hook_id, hook in list(module._forward_hooks.items()):
                if hook is _add_lora_output:
                    del module._forward_hooks[hook_id]
            del module.lora
            merged += 1
    return merged
