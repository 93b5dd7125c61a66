"""LoRA written from scratch: targets, trainability, save/load, merge."""
import copy

import pytest
import torch

from conftest import tiny_model
from model.model_lora import apply_lora, load_lora, lora_state_dict, merge_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


def ids(seed=0):
    return torch.randint(3, 6400, (2, 9), generator=torch.Generator().manual_seed(seed))


def randomise_lora(model, seed=0):
    """B starts at zero; give it values so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_default_targets_square_linears_with_131072_parameters_at_512x8():
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig())
        count = apply_lora(model, rank=8)
    assert count == 131_072  # 8 layers x (q_proj, o_proj) x (8*512 + 512*8)
    adapted = sorted({n.split(".lora.")[0].split(".")[-1] for n, _ in model.named_parameters() if ".lora." in n})
    assert adapted == ["o_proj", "q_proj"]
    assert model.state_dict()["model.layers.0.self_attn.q_proj.lora.A.weight"].shape == (8, 512)
    assert model.state_dict()["model.layers.0.self_attn.q_proj.lora.B.weight"].shape == (512, 8)


def test_only_lora_parameters_are_trainable_and_start_as_identity():
    model = tiny_model()
    ref = copy.deepcopy(model)
    apply_lora(model, rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, ref(ids()).logits)  # B = 0 at start
    lora_a = model.model.layers[0].self_attn.q_proj.lora.A.weight
    assert 0.01 < lora_a.std().item() < 0.03  # A ~ N(0, 0.02)


def test_training_moves_only_lora_weights():
    model = tiny_model().train()
    apply_lora(model, rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != (".lora." in n), n


def test_target_modules_and_alpha_scaling():
    model = tiny_model()
    count = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    attn = model.model.layers[0].self_attn
    assert hasattr(attn.q_proj, "lora") and hasattr(attn.v_proj, "lora") and not hasattr(attn.o_proj, "lora")
    assert attn.v_proj.lora.scaling == 2.0
    assert count == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    with pytest.raises(ValueError, match="no Linear layer matching"):
        apply_lora(tiny_model(), target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, target_modules=["q_proj"])


def test_saved_file_holds_only_lora_tensors_on_cpu(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4)
    randomise_lora(model)
    path = str(tmp_path / "lora" / "lora_identity_64.pth")
    save_lora(model, path)
    state = torch.load(path, weights_only=True)
    assert state and all(".lora." in k for k in state)
    assert len(state) == 2 * 2 * 2  # layers x (q, o) x (A, B)
    assert all(t.device.type == "cpu" and t.dtype == torch.float16 for t in state.values())
    assert not list(tmp_path.glob("lora/*.tmp*"))


def test_load_lora_reproduces_outputs_and_accepts_ddp_prefix(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4)
    randomise_lora(model)
    path = str(tmp_path / "adapter.pth")
    save_lora(model, path, dtype=torch.float32)
    fresh = tiny_model()
    apply_lora(fresh, rank=4)
    load_lora(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, model(ids()).logits)
    # a state dict taken from a DDP-wrapped model carries `module.`
    prefixed = {f"module.{k}": v for k, v in lora_state_dict(model, torch.float32).items()}
    other = tiny_model()
    apply_lora(other, rank=4)
    load_lora(other, prefixed)
    with torch.no_grad():
        assert torch.equal(other(ids()).logits, model(ids()).logits)


def test_load_lora_mismatch_is_a_clear_error(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4)
    path = str(tmp_path / "r4.pth")
    save_lora(model, path)
    other = tiny_model()
    apply_lora(other, rank=8)
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.self_attn\.q_proj\.lora\.A\.weight"):
        load_lora(other, path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_lora(tiny_model(), path)


def test_merged_model_equals_adapted_model():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8)
    randomise_lora(model)
    with torch.no_grad():
        adapted = model(ids()).logits
        assert merge_lora(model) == 4
        merged = model(ids()).logits
    assert not any(".lora." in k for k in model.state_dict())
    assert (adapted - merged).abs().max() < 1e-5
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # plain checkpoint again


def test_deepcopy_of_adapted_model_is_independent():
    """Reference models in DPO/RL are deep copies: the copy must use its own adapters."""
    model = tiny_model()
    apply_lora(model, rank=4)
    randomise_lora(model, seed=1)
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        expected = frozen(ids()).logits
        randomise_lora(model, seed=2)
        assert torch.equal(frozen(ids()).logits, expected)
        merge_lora(model)
        assert torch.equal(frozen(ids()).logits, expected)
