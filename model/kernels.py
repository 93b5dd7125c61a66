"""Which torch kernel a device gets, and why: the fast paths behind model_minimind.py.

The model writes attention and the experts as plain maths; it calls this module from one place in attention
(attention()) and one in the MoE layer (can_group_experts() / grouped_experts()), and once per forward for
packed rows (packed_rows()). Each choice below names the torch 2.13 source that decides it, so the GPU paths
are right by construction and tests/test_gpu_paths.py can check them on a CPU with torch.cuda patched.
"""
import torch
import torch.nn.functional as F

# scripts/gpu_check.py sets this to a function that sees every SDPA call's arguments first (it runs each new kind
# of call once under the fast kernels only, so a fall to the math kernel fails loudly).
ATTENTION_PROBE = None


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on (embeddings stay fp32 under autocast)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


# -- attention --------------------------------------------------------------------------------------------------

def sdpa_needs_repeated_kv(device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA's fast kernel for this call needs the grouped K/V heads repeated to the query heads.

    On CUDA (torch 2.13, sdp_utils.cpp) the flash kernel handles GQA itself but takes no mask, only
    fp16/bf16 and only sm80+ GPUs; the memory-efficient kernel, which takes masks, fp32 and older GPUs,
    rejects GQA (check_batch_size_and_num_heads_dense<false>), so without repeated heads those calls fall
    to the math kernel. A CPU's flash kernel takes GQA with or without a mask in every dtype
    (sdp_utils_cpp.cpp: check_batch_size_and_num_heads_dense<true>), so a CPU never copies K/V (the copy
    cost a CPU demo 4% of its time). Other devices (MPS) always get repeated heads, which every SDPA
    implementation takes.
    """
    if device.type == "cpu":
        return False
    # get_device_properties: torch.compile folds it to a constant (no graph break inside the forward)
    flash = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not masked
             and torch.cuda.get_device_properties(device).major >= 8)
    return not flash


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed rows can go through torch's varlen flash attention (torch.nn.attention.varlen).

    varlen_attn calls aten._flash_attention_forward (torch 2.13, varlen.py), which exists on CUDA only,
    for fp16/bf16 on sm80+ GPUs, and hardcodes dropout 0 - the same conditions as SDPA's flash kernel.
    Elsewhere packed rows take a block-diagonal causal mask instead (exact, on the CPU's flash kernel too).
    """
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_properties(device).major >= 8)


def varlen_attn(*args, **kwargs):
    """torch.nn.attention.varlen.varlen_attn, imported on first use: importing it pulls in torch._dynamo, and only
    CUDA runs it. (transformers' masking_utils imports torch._dynamo too, so today this alone saves no start-up
    time: measured 6.0-6.5 s to import model_minimind before and after, on 2 busy cores.)"""
    from torch.nn.attention.varlen import varlen_attn as kernel
    return kernel(*args, **kwargs)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, documents=None):
    """softmax(q k^T / sqrt(d) + mask) v on the fastest kernel this device has for the call.

    q [B, Hq, T, D], k / v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA); attn_mask None or the additive bias
    [B|1, 1, T, S] of additive_mask; documents (cu_seqlens, longest) of packed rows (see packed_rows) -> varlen flash
    attention over the flattened batch, each document attending causally to itself. Returns [B, Hq, T, D]."""
    batch, num_heads, seq_len, head_dim = q.shape
    if documents is not None:  # (only without earlier cached tokens, so k and v are this call's)
        cu_seqlens, longest = documents
        flat = [t.transpose(1, 2).reshape(batch * seq_len, -1, head_dim) for t in (q, k, v)]
        out = varlen_attn(*flat, cu_seqlens, cu_seqlens, longest, longest, window_size=(-1, 0), enable_gqa=True)
        return out.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    gqa = not sdpa_needs_repeated_kv(q.device, q.dtype, masked=attn_mask is not None)
    if not gqa:
        groups = num_heads // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if ATTENTION_PROBE is not None:
        ATTENTION_PROBE(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=gqa)


def additive_mask(allowed, dtype):
    """A bool mask [B|1, 1, T, S] (True = may attend) as the additive 0 / -inf bias softmax(q k^T / sqrt(d) + bias)
    takes, in the compute dtype, made once per forward: given a bool mask, SDPA builds this bias again in every layer
    (torch 2.13, convert_boolean_attn_mask) and the backward keeps each layer's copy. The last dimension is allocated
    padded to a multiple of 16 and sliced back, so each row starts 16-element aligned, as CUDA's memory-efficient
    kernel needs (it would pad a copy itself)."""
    *lead, keys = allowed.shape
    bias = torch.full((*lead, -(-keys // 16) * 16), float("-inf"), dtype=dtype, device=allowed.device)
    return bias[..., :keys].masked_fill_(allowed, 0.0)


# -- packed rows ------------------------------------------------------------------------------------------------

def document_starts(position_ids):
    """bool [B, T]: where a document of a packed row starts - where the position ids restart at 0, and at
    every row's first token (so a row never continues a document from the row before)."""
    first_column = torch.arange(position_ids.shape[-1], device=position_ids.device) == 0  # no scalar from the host
    return (position_ids == 0) | first_column


def document_mask(position_ids):
    """Causal attention inside each document of a packed row: bool [B, 1, T, T], True = may attend.

    doc[t] = the number of document starts up to t; query t sees key s iff s <= t and doc[s] == doc[t].
    """
    doc = document_starts(position_ids).cumsum(dim=-1)
    seq_len = position_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def document_offsets(position_ids):
    """The packed batch as one stream of documents for varlen attention: (cu_seqlens int32 [D + 1] = where
    each of the D documents starts in the flattened B*T tokens, then B*T; the longest document's length).
    Host work on a CPU tensor (the trainers' collator calls it: trainer.sampler.collate); on a GPU tensor nonzero
    and int would each wait for the device."""
    starts = document_starts(position_ids).reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_rows(position_ids, hidden, dropout, documents=None):
    """How attention keeps packed documents apart: (attn_mask, documents) for attention(). Varlen flash attention
    where it runs (no dropout: it has none), else the exact block-diagonal causal mask. documents: the collator's
    (cu_seqlens, longest) from the CPU copy, else found here from position_ids (host reads on a GPU)."""
    if varlen_usable(hidden.device, compute_dtype(hidden)) and not dropout:
        cu_seqlens, longest = documents if documents is not None else document_offsets(position_ids)
        # non_blocking: the CPU does not wait for the GPU's queue to copy a few offsets
        return None, (cu_seqlens.to(hidden.device, non_blocking=True), int(longest))
    return document_mask(position_ids), None


# -- mixture of experts -----------------------------------------------------------------------------------------

def can_group_experts(tokens, hidden_size, intermediate_size):
    """Whether the experts can run as grouped matmuls (grouped_experts) on this device.

    grouped_mm needs 16-byte aligned rows, and on CUDA bf16 on an sm90 GPU (H100, H200): torch 2.13's
    _grouped_mm_cuda takes its CUTLASS kernel only on sm90 / sm100 (_scaled_mm_allowed_device and bf16); on
    sm80/86/89/120 it falls back to one matmul per expert after copying the offsets to the host (a sync), so the
    sync-free masked dense path is used instead. sm100 (B200) is left out too: there the backward gives experts that
    got no tokens non-zero weight gradients (pytorch/pytorch#172439, open). The CPU runs it in fp32 and bf16."""
    dtype = compute_dtype(tokens)
    aligned = all(n * torch.finfo(dtype).bits // 8 % 16 == 0 for n in (hidden_size, intermediate_size))
    if tokens.device.type == "cpu":
        return aligned and dtype in (torch.float32, torch.bfloat16)
    if tokens.device.type == "cuda":
        return aligned and dtype == torch.bfloat16 and torch.cuda.get_device_properties(tokens.device).major == 9
    return False


def grouped_experts(experts, act_fn, tokens, topk_idx, topk_weight):
    """sum_k weight_k * expert_k(token), with the (token, expert) slots sorted by expert and each projection one
    grouped matmul over per-expert row ranges (offsets stay on the device: no host sync, no per-expert branch).
    tokens [N, H], topk_idx / topk_weight [N, k] -> [N, H]."""
    num_tokens, k = topk_idx.shape
    dtype = compute_dtype(tokens)
    expert_of_slot = topk_idx.reshape(-1)                            # [N*k]
    order = expert_of_slot.argsort(stable=True)                      # slots grouped by expert
    sorted_tokens = tokens[order // k].to(dtype)                     # [N*k, H]
    slots_per_expert = F.one_hot(expert_of_slot, len(experts)).sum(dim=0)
    group_ends = slots_per_expert.cumsum(dim=0).to(torch.int32)     # offsets stay on the device

    def grouped(inputs, name):  # inputs @ W_e^T for each expert's row range
        weights = torch.stack([getattr(e, name).weight for e in experts]).to(dtype)  # [E, out, in]
        return F.grouped_mm(inputs, weights.transpose(1, 2), offs=group_ends)

    hidden = act_fn(grouped(sorted_tokens, "gate_proj")) * grouped(sorted_tokens, "up_proj")
    sorted_out = grouped(hidden, "down_proj") * topk_weight.reshape(-1)[order].unsqueeze(-1).to(dtype)
    slot_out = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)  # back to slot order
    return slot_out.view(num_tokens, k, -1).sum(dim=1)
