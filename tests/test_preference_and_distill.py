"""DPO, reasoning distillation and knowledge distillation: losses on hand-worked examples, trl parity,
tag weighting with both kinds of tokenizer, and each stage end to end."""
import collections
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import REPO_ROOT, tiny_model
from test_train import metrics, run_script

from trainer import train_distill_reason
from trainer import train_distillation
from trainer import losses
from trainer import train_dpo
from trainer.sampler import loss_positions

MODEL_DIR = os.path.join(REPO_ROOT, "model")


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

def test_dpo_loss_hand_worked():
    # rewards: 0.1 * (-1 - -1.5) = 0.05 and 0.1 * (-2 - -1.5) = -0.05; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    loss, chosen, rejected = train_dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                                torch.tensor([-1.5]), beta=0.1)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), rel=1e-6)


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """trl's own DPOTrainer._compute_loss (sigmoid loss) on the given per-sequence log-probs: a stub model
    returns per-token log-probs whose sums over the completion are those values."""
    from trl import DPOTrainer
    batch, length = chosen.shape[0], 4
    per_token = torch.zeros(2 * batch, length - 1)
    per_token[:batch, 0], per_token[batch:, 0] = chosen, rejected

    class StubModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros(2 * batch, length - 1)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                   loss=torch.tensor(0.0), aux_loss=None, logits=None)

    trainer = SimpleNamespace(
        model=StubModel(), ref_model=None, beta=beta, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None, label_smoothing=0.0, use_weighting=False,
        precompute_ref_logps=True, aux_loss_enabled=False, router_aux_loss_coef=0.0, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), args=SimpleNamespace(),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x))
    ones = torch.ones(2 * batch, length, dtype=torch.long)
    inputs = dict(input_ids=ones, attention_mask=ones, completion_mask=ones,
                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return DPOTrainer._compute_loss(trainer, StubModel(), inputs, return_outputs=False)


def test_dpo_loss_equals_trl_sigmoid_loss():
    g = torch.Generator().manual_seed(0)
    values = [-torch.rand(6, generator=g) * 20 for _ in range(4)]
    ours, _, _ = train_dpo.dpo_loss(*values, beta=0.1)
    assert ours.mean().item() == pytest.approx(trl_dpo_loss(*values, beta=0.1).item(), rel=1e-6)


def test_sequence_logps_mean_and_sum():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2], [1 / 3] * 3]]))
    labels = torch.tensor([[-100, 1, 2, 0]])  # positions 1..3 predicted from logits 0..2
    total = math.log(0.25) + math.log(0.7) + math.log(0.6)
    at = loss_positions(labels)
    assert at.tolist() == [0, 1, 2]
    assert losses.sequence_logps(logits[0, at], labels, at, "sum").item() == pytest.approx(total, rel=1e-5)
    assert losses.sequence_logps(logits[0, at], labels, at, "mean").item() == pytest.approx(total / 3, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_answer_logps_from_the_loss_positions_equal_the_full_logits_ones(reduction):
    """DPO's pairs: the collator's loss_index in stack_pairs' layout, the head there only (forward(loss_index=...),
    [K, V] logits) and each row's log-prob added up from its positions give those of the full logits."""
    from dataset.lm_dataset import stack_pairs
    from trainer.sampler import collate
    torch.manual_seed(0)
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(((5, 4, 2), (3, 6, 5), (8, 1, 3))):
        pair = {}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.randint(1, 400, (prompt + answer,))
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = ids.masked_fill(torch.arange(prompt + answer) < prompt, -100)
        rows.append(dict(pair, index=torch.tensor(i)))
    batch = collate(rows)
    ids, _, labels = stack_pairs(batch, pad_id=0)
    assert batch["loss_index"].tolist() == [i for i, label in enumerate(labels[:, 1:].reshape(-1).tolist())
                                            if label != -100]
    model = tiny_model()
    targets = labels[:, 1:]  # from the full logits: log_softmax, the targets' entries, masked, summed per row
    per_token = model(ids).logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    full = (per_token * (targets != -100)).sum(-1)
    if reduction == "mean":
        full = full / (targets != -100).sum(-1)
    at = model(ids, loss_index=batch["loss_index"]).logits
    assert at.shape == (len(batch["loss_index"]), model.config.vocab_size)
    torch.testing.assert_close(losses.sequence_logps(at, labels, batch["loss_index"], reduction), full)


# --------------------------------------------------------------------------------------------
# Reasoning distillation
# --------------------------------------------------------------------------------------------

def reasoning_row(tokenizer):
    messages = [{"role": "user", "content": "literally <think> in a question"},
                {"role": "assistant", "content": "<think>\n2+2 is 4\n</think>\n<answer>\n4\n</answer>"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = ids.clone()
    labels[0, [i for i, (a, _) in enumerate(offsets) if a < start]] = -100
    return text, ids, labels, offsets


def weighted_text(tokenizer, ids, weights, value):
    return tokenizer.decode(ids[0][weights[0] == value])


def test_tag_weights_with_single_token_tags():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    sequences = train_distill_reason.tag_token_sequences(tokenizer)
    assert sorted(sequences) == [(3,), (4,), (5,), (6,)]  # one token each
    _, ids, labels, _ = reasoning_row(tokenizer)
    weights = train_distill_reason.tag_loss_weights(ids, labels, sequences, 10.0)
    assert weighted_text(tokenizer, ids, weights, 10.0) == "<think></think><answer></answer>"
    assert (weights[labels == -100] == 0).all()  # the <think> in the user turn gets nothing
    assert (weights[(labels != -100) & (weights != 10)] == 1).all()


def test_tag_weights_with_a_tokenizer_that_splits_the_tags(tmp_path):
    """A byte-level BPE that never saw the tags: each tag becomes several sub-word tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world, 2+2 is 4, answers and thinking"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    config = json.load(open(os.path.join(MODEL_DIR, "tokenizer_config.json"), encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=config["chat_template"])
    sequences = train_distill_reason.tag_token_sequences(tokenizer)
    assert all(len(s) > 1 for s in sequences)
    text, ids, labels, offsets = reasoning_row(tokenizer)
    weights = train_distill_reason.tag_loss_weights(ids, labels, sequences, 10.0)
    assert weighted_text(tokenizer, ids, weights, 10.0) == "<think></think><answer></answer>"
    assert (weights[labels == -100] == 0).all()
    assert weights.sum() == 10 * sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in
                                     train_distill_reason.TAGS) + int(((labels != -100) & (weights == 1)).sum())


def test_conversations_without_tags_are_counted_inside_packed_rows():
    # row 0 packs three conversations (tagged, untagged, untagged), row 1 one tagged and padding (position 0s)
    weights = torch.tensor([[0, 1, 10, 0, 1, 1, 0, 1, 1], [0, 10, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0, 0]])
    assert int(train_distill_reason.conversations_without_tags(weights, positions)) == 2
    assert int(train_distill_reason.conversations_without_tags(weights)) == 0  # as rows: both have a tag


def test_weighted_loss_normalises_by_the_weight_sum():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 5)
    labels = torch.tensor([[-100, -100, 2, 4, 1]])  # position 0 predicts no label: no loss there
    weights = torch.tensor([[0.0, 0.0, 10.0, 1.0, 1.0]])
    loss_index = loss_positions(labels)
    assert loss_index.tolist() == [1, 2, 3]
    ce = F.cross_entropy(logits[0, 1:4], torch.tensor([2, 4, 1]), reduction="none")
    expected = (10 * ce[0] + ce[1] + ce[2]) / 12
    got = train_distill_reason.weighted_next_token_loss(logits[0, loss_index], losses.at_loss_positions(
        labels, loss_index), losses.at_loss_positions(weights, loss_index))
    assert got.item() == pytest.approx(expected.item())


# --------------------------------------------------------------------------------------------
# Knowledge distillation
# --------------------------------------------------------------------------------------------

def test_kd_term_is_the_hand_computed_kl():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 1]])  # only position 0 is scored
    T, alpha = 2.0, 0.3

    def softmax(row):
        e = [math.exp(x / T) for x in row]
        return [x / sum(e) for x in e]
    p, q = softmax([2.0, 1.0, 0.0]), softmax([1.0, 2.0, 0.5])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(math.exp(2.0) / sum(math.exp(x) for x in [1.0, 2.0, 0.5]))
    at = loss_positions(labels)  # the head runs there only: [K, V] logits
    total, got_ce, got_kl = train_distillation.distillation_loss(student[0, at], teacher[0, at],
                                                                 losses.at_loss_positions(labels, at), alpha, T)
    assert got_kl.item() == pytest.approx(kl, rel=1e-5) and got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, rel=1e-5)


# --------------------------------------------------------------------------------------------
# The stages end to end
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage5")
    run_script("train_full_sft.py", "--from_weight", "none", "--max_steps", "2", "--dtype", "float32", tmp=tmp)
    return tmp


def test_dpo_runs_from_trainer_dir_and_logs_preference_metrics(sft_weights):
    run_script("train_dpo.py", "--max_steps", "2", "--max_seq_len", "128", cwd=os.path.join(REPO_ROOT, "trainer"),
               tmp=sft_weights)
    assert (sft_weights / "out" / "dpo_64.pth").exists()
    first = metrics(sft_weights, "dpo_64_metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(first)


def test_dpo_with_moe_keeps_the_balancing_loss(tmp_path):
    run_script("train_dpo.py", "--max_steps", "2", "--max_seq_len", "128", "--from_weight", "none", "--use_moe", "1",
               "--dtype", "float32", tmp=tmp_path)
    rows = metrics(tmp_path, "dpo_64_moe_metrics.jsonl")
    assert len(rows) == 2 and all(row["aux_loss"] > 0 for row in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the DPO term itself, logged apart


def test_dpo_precomputed_reference_under_two_processes_equals_one(tmp_path, sft_weights):
    # MiniMind's random batches: grouping by length sorts within each process's batches (see test_train)
    common = ["--max_steps", "2", "--max_seq_len", "128", "--dtype", "float32", "--precompute_ref", "1",
              "--learning_rate", "1e-3", "--group_by_length", "0"]
    for name in ("one", "two"):
        (tmp_path / name / "out").mkdir(parents=True)
        (tmp_path / name / "out" / "full_sft_64.pth").write_bytes((sft_weights / "out" / "full_sft_64.pth").read_bytes())
    run_script("train_dpo.py", *common, "--batch_size", "4", tmp=tmp_path / "one")
    result = run_script("train_dpo.py", *common, "--batch_size", "2", tmp=tmp_path / "two", torchrun=2)
    assert "reference log-probs of 2000 pairs precomputed" in result.stdout
    one, two = metrics(tmp_path / "one", "dpo_64_metrics.jsonl"), metrics(tmp_path / "two", "dpo_64_metrics.jsonl")
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]


def test_dpo_resumes_exactly(tmp_path, sft_weights):
    common = ["--max_seq_len", "128", "--dtype", "float32", "--learning_rate", "1e-3", "--data_path",
              os.path.join(REPO_ROOT, "dataset", "demo", "dpo_eval.jsonl")]
    for name in ("straight", "resumed"):
        (tmp_path / name / "out").mkdir(parents=True)
        (tmp_path / name / "out" / "full_sft_64.pth").write_bytes((sft_weights / "out" / "full_sft_64.pth").read_bytes())
    run_script("train_dpo.py", *common, "--max_steps", "6", tmp=tmp_path / "straight")
    run_script("train_dpo.py", *common, "--max_steps", "3", tmp=tmp_path / "resumed")
    run_script("train_dpo.py", *common, "--max_steps", "6", "--from_resume", "1", tmp=tmp_path / "resumed")
    assert metrics(tmp_path / "straight", "dpo_64_metrics.jsonl") and \
        [(m["step"], m["loss"]) for m in metrics(tmp_path / "straight", "dpo_64_metrics.jsonl")] == \
        [(m["step"], m["loss"]) for m in metrics(tmp_path / "resumed", "dpo_64_metrics.jsonl")]


@pytest.mark.parametrize("packing", ["0", "1"])
def test_reasoning_distillation_counts_conversations_without_tags(tmp_path, sft_weights, packing):
    """Packed, the 8 conversations share two rows of 64 tokens: each is still counted on its own."""
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"},
                               {"role": "assistant", "content": f"<think>\nt{i}\n</think>\n<answer>\na{i}\n</answer>"}]}
            for i in range(7)]
    rows.append({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no tags here"}]})
    path = tmp_path / "r1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dpo_64.pth").write_bytes((sft_weights / "out" / "full_sft_64.pth").read_bytes())
    result = run_script("train_distill_reason.py", "--data_path", str(path), "--batch_size", "8", "--max_steps", "1",
                        "--packing", packing, tmp=tmp_path)
    assert "1 conversations seen in training had no <think>/<answer> tag" in result.stdout
    assert (tmp_path / "out" / "reason_64.pth").exists()


def test_knowledge_distillation_of_different_sizes(tmp_path, sft_weights):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "full_sft_64.pth").write_bytes((sft_weights / "out" / "full_sft_64.pth").read_bytes())
    run_script("train_distillation.py", "--student_hidden_size", "32", "--student_num_layers", "1",
               "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--from_weight", "none", "--max_steps", "2",
               tmp=tmp_path)
    first = metrics(tmp_path, "full_dist_32_metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(0.5 * first["ce"] + 0.5 * 1.5 ** 2 * first["kl"], rel=1e-3)
    assert (tmp_path / "out" / "full_dist_32.pth").exists()


def test_knowledge_distillation_refuses_a_teacher_with_another_vocabulary(tmp_path):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    (tmp_path / "out").mkdir()
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100))
    torch.save({k: v.half() for k, v in teacher.state_dict().items()}, tmp_path / "out" / "full_sft_64.pth")
    result = run_script("train_distillation.py", "--student_hidden_size", "32", "--student_num_layers", "1",
                        "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--from_weight", "none",
                        "--max_steps", "1", tmp=tmp_path, check=False)
    assert result.returncode != 0
    assert "has a vocabulary of 100 tokens, the student 6400" in result.stderr + result.stdout
