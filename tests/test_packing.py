"""SFT packing (--packing 1): whole conversations share a row, attention stays inside each one, and
the loss is the unpacked loss."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, tiny_model

import model.kernels as kernels  # noqa: E402
from dataset.lm_dataset import SFTDataset, pad_batch  # noqa: E402
from test_train import metrics, run_script  # noqa: E402
from common.tokenizer import load_tokenizer


def count_label_tokens(labels):
    """Positions that carry loss after the shift, as the trainers count them."""
    return int((labels[:, 1:] != -100).sum())


def next_token_loss(model, batch):
    """The SFT forward as train_full_sft.py runs it: no attention mask, packed rows' position ids."""
    out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))
    return out.loss, out.aux_loss


MAX_LEN = 128


@pytest.fixture(scope="module")
def datasets_(tmp_path_factory):
    """The first 120 demo SFT conversations, one per row and packed."""
    tmp = tmp_path_factory.mktemp("packing")
    path = tmp / "sft.jsonl"
    with open(os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl"), encoding="utf-8") as f:
        path.write_text("".join(f.readline() for _ in range(120)), encoding="utf-8")
    tokenizer = load_tokenizer()
    plain = SFTDataset(str(path), tokenizer, MAX_LEN, cache_dir=str(tmp / "cache"))
    packed = SFTDataset(str(path), tokenizer, MAX_LEN, packing=True, cache_dir=str(tmp / "cache"))
    return plain, packed


def sharp_model(seed):
    """A tiny model with its matrices scaled up, so attention is far from uniform and a leak shows."""
    model = tiny_model(seed=seed).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def whole_loss(model, dataset, batch_size, **forward):
    """Mean next-token loss over every label token of the dataset (float64 sums of batch means)."""
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = pad_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        n = count_label_tokens(batch["labels"])
        total += float(forward.get("loss", next_token_loss)(model, batch)[0]) * n
        count += n
    return total / count


def test_packing_keeps_every_conversation_once_in_full_rows(datasets_):
    plain, packed = datasets_
    assert len(packed) < len(plain) / 2  # short conversations: several to a row
    conversations = sorted(tuple(plain[i]["input_ids"].tolist()) for i in range(len(plain)))
    pieces = []
    for i in range(len(packed)):
        row = packed[i]
        assert len(row["input_ids"]) <= MAX_LEN
        starts = (row["position_ids"] == 0).nonzero().squeeze(-1).tolist() + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b].tolist() == list(range(b - a))  # positions restart per conversation
            assert row["labels"][a] == -100  # a conversation's first token is never learnt from the one before
            pieces.append(tuple(row["input_ids"][a:b].tolist()))
    assert sorted(pieces) == conversations
    labels = sorted(tuple(plain[i]["labels"].tolist()) for i in range(len(plain)))
    assert sum(count_label_tokens(packed[i]["labels"][None]) for i in range(len(packed))) == \
        sum(count_label_tokens(torch.tensor([l])) for l in labels)
    real = sum(len(packed[i]["input_ids"]) for i in range(len(packed)))
    assert real / (len(packed) * MAX_LEN) > 0.9  # first-fit decreasing leaves little room unused


def test_packed_loss_equals_the_unpacked_loss(datasets_):
    plain, packed = datasets_
    model = sharp_model(seed=3).eval()
    with torch.no_grad():
        unpacked = whole_loss(model, plain, 8)
        together = whole_loss(model, packed, 4)

        def leaky(model, batch):  # the same rows without position ids: conversations see each other
            return model(batch["input_ids"], labels=batch["labels"]).loss, None
        leaked = whole_loss(model, packed, 4, loss=leaky)
    assert abs(together - unpacked) < 1e-5 * unpacked
    # the check can fail: without the per-conversation mask the loss moves by 10x the tolerance
    assert abs(leaked - unpacked) > 1e-4 * unpacked


def test_packed_gradients_equal_the_unpacked_gradients(datasets_):
    plain, packed = datasets_

    def grads(dataset, batch_size):
        model = sharp_model(seed=4).train()
        count = sum(count_label_tokens(dataset[i]["labels"][None]) for i in range(len(dataset)))
        for start in range(0, len(dataset), batch_size):
            batch = pad_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            (next_token_loss(model, batch)[0] * count_label_tokens(batch["labels"]) / count).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    a, b = grads(plain, 16), grads(packed, 8)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa, calls):
    """What torch's varlen flash attention computes, written with one SDPA call per document (CPU)."""
    calls.append(dict(cu=cu_q.clone(), max_q=max_q, window_size=window_size, enable_gqa=enable_gqa,
                      q_shape=tuple(q.shape), k_shape=tuple(k.shape)))
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    out = torch.empty_like(q)
    for a, b in zip(cu_q.tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T_doc, D]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=window_size == (-1, 0),
                                                  enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


def test_the_varlen_path_flattens_the_documents_as_flash_varlen_expects(datasets_, monkeypatch):
    """On a CUDA bf16 sm80+ GPU packed rows go to torch.nn.attention.varlen.varlen_attn; here it is
    replaced by a per-document reference, so the flattening, offsets and arguments are checked on the CPU."""
    plain, packed = datasets_
    calls = []
    monkeypatch.setattr(kernels, "varlen_usable", lambda device, dtype: True)
    monkeypatch.setattr(kernels, "varlen_attn", lambda *a, **kw: reference_varlen(*a, **kw, calls=calls))
    model = sharp_model(seed=3).eval()
    with torch.no_grad():
        through_varlen = whole_loss(model, packed, 4)
        monkeypatch.setattr(kernels, "varlen_usable", lambda device, dtype: False)
        unpacked = whole_loss(model, plain, 8)
    assert abs(through_varlen - unpacked) < 1e-5 * unpacked
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    first = calls[0]
    batches = [pad_batch([packed[i] for i in range(s, min(s + 4, len(packed)))]) for s in range(0, len(packed), 4)]
    # a batch whose rows hold one conversation each (no restart inside a row) takes plain causal attention
    with_restarts = [b for b in batches if bool((b["position_ids"][:, 1:] == 0).any())]
    assert 0 < len(with_restarts) < len(batches)
    batch = with_restarts[0]
    tokens = batch["input_ids"].numel()
    assert first["q_shape"] == (tokens, config.num_attention_heads, head_dim)
    assert first["k_shape"] == (tokens, config.num_key_value_heads, head_dim)  # GQA heads, not repeated
    assert first["window_size"] == (-1, 0) and first["enable_gqa"]
    starts = (batch["position_ids"].flatten() == 0).nonzero().squeeze(-1).tolist()
    assert first["cu"].tolist() == starts + [tokens]
    assert first["max_q"] == max(b - a for a, b in zip(starts + [tokens], (starts + [tokens])[1:]))
    assert len(calls) == config.num_hidden_layers * len(with_restarts)  # every layer, every packed batch


@pytest.mark.parametrize("device,dtype,major,expected", [
    ("cuda", torch.bfloat16, 8, True), ("cuda", torch.float16, 9, True), ("cuda", torch.bfloat16, 7, False),
    ("cuda", torch.float32, 9, False), ("cpu", torch.bfloat16, 0, False)])
def test_varlen_only_where_the_flash_kernel_runs(monkeypatch, device, dtype, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"major": major})())
    assert kernels.varlen_usable(torch.device(device), dtype) is expected


def test_sdpa_gets_a_block_diagonal_mask_on_the_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "ATTENTION_PROBE", lambda q, k, v, **kw: seen.append(kw))
    model = tiny_model(seed=0).eval()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]), position_ids=positions)
    mask = seen[0]["attn_mask"][0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask == 0, expected) and not seen[0]["is_causal"]  # the additive bias: 0 where allowed
    seen.clear()
    with torch.no_grad():  # without position ids, a training row stays on the plain causal kernel
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    assert seen[0]["attn_mask"] is None and seen[0]["is_causal"]


def test_a_generate_prefill_takes_the_causal_fast_path(monkeypatch):
    """generate() passes position ids 0..T-1 and drops an all-ones mask at every prefill: that is one document
    per row, so SDPA gets is_causal and no mask (a dense [B, 1, T, T] mask would cost the fast kernel).
    Positions that run on without restarting (a row cut mid-document) are one document too, and give the
    logits the block-diagonal mask gives."""
    seen = []
    monkeypatch.setattr(kernels, "ATTENTION_PROBE", lambda q, k, v, **kw: seen.append((q.shape[2], kw)))
    model = tiny_model(seed=0).eval()
    prompt = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
    prefill = [kw for length, kw in seen if length == prompt.shape[1]]
    assert len(prefill) == model.config.num_hidden_layers
    assert all(kw["attn_mask"] is None and kw["is_causal"] for kw in prefill)
    seen.clear()
    ids, positions = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        fast = model(ids, position_ids=positions).logits
        masked = model(ids, attention_mask=torch.ones_like(ids), position_ids=positions).logits
    assert seen[0][1]["attn_mask"] is None and seen[0][1]["is_causal"]
    assert torch.allclose(fast, masked, atol=1e-5)
    assert kernels.document_mask(positions)[0, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("script,extra", [
    ("train_full_sft.py", []),
    ("train_distill_reason.py", ["--data_path", os.path.join(REPO_ROOT, "dataset", "demo", "r1.jsonl")])])
def test_trainers_run_packed_and_resume(tmp_path, script, extra):
    common = ["--from_weight", "none", "--dtype", "float32", "--packing", "1", "--epochs", "1", *extra]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script(script, *common, "--max_steps", "4", tmp=straight)
    run_script(script, *common, "--max_steps", "2", tmp=interrupted)
    run_script(script, *common, "--max_steps", "4", "--from_resume", "1", tmp=interrupted)
    name = "full_sft_64_metrics.jsonl" if script == "train_full_sft.py" else "reason_64_metrics.jsonl"
    a, b = metrics(straight, name), metrics(interrupted, name)
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and len(a) == 4
    # packed rows: every row of a batch is (nearly) full
    assert all(m["tokens_per_s"] > 0 for m in a)


def test_every_row_starts_a_document():
    """A row whose positions do not start at 0 (a document cut at the row's start) is still its own document:
    nothing crosses from the row before, in the mask and in the varlen offsets."""
    positions = torch.tensor([[2, 3, 0, 1], [0, 1, 2, 0]])
    mask = kernels.document_mask(positions)[:, 0]
    assert torch.equal(mask[0].int(), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]))
    assert torch.equal(mask[1].int(), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]))
    cu_seqlens, longest = kernels.document_offsets(positions)
    assert cu_seqlens.tolist() == [0, 2, 4, 7, 8] and longest == 3
    assert positions.tolist() == [[2, 3, 0, 1], [0, 1, 2, 0]]  # the caller's tensor is left as it was
