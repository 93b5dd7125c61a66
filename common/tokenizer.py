"""Which tokenizer a weight reads. The tokenizer in use is --tokenizer_dir, else the one a model folder ships, else
model/ (this project's). A .pth carries no tokenizer, so every .pth this project saves gets a record beside it
(out/full_sft_512.pth -> out/full_sft_512.tokenizer.json: the tokenizer's folder, the hashes of its vocabulary and
chat template, the model generation, and the hash of the weight file it describes), and every load compares the
record with the tokenizer in use. A .pth without one (downloaded from elsewhere) is probed instead: its loss on a
plain sentence as each tokenizer the user could name encodes it. Used by the trainers, the chat/serving code and
the converters."""
import hashlib
import json
import math
import os
import sys

import torch

from common.files import atomic_write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECT_TOKENIZER = os.path.join(REPO_ROOT, "model")


def load_tokenizer(path=PROJECT_TOKENIZER):
    from transformers import AutoTokenizer
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise SystemExit(f"no tokenizer at {path}: expected tokenizer.json and tokenizer_config.json "
                         "(python scripts/train_tokenizer.py writes them; a released model folder ships its own)")
    return AutoTokenizer.from_pretrained(path)


def tokenizer_id(tokenizer):
    """A short hash of the token -> id mapping (None without a tokenizer), which a resume file keeps."""
    if tokenizer is None:
        return None
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def template_id(tokenizer):
    """A short hash of the chat template (None when the tokenizer has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def has_tokenizer(folder):
    return os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "tokenizer.json"))


def tokenizer_for(weight, tokenizer_dir=None):
    """(tokenizer, its folder) for a weight (a .pth file, a model folder, or None): tokenizer_dir; else the one a
    model folder ships, the one it was trained with; else model/. A tokenizer_dir that differs from the one the
    folder ships is refused, saying how."""
    own = weight is not None and has_tokenizer(weight)
    path = tokenizer_dir or (weight if own else PROJECT_TOKENIZER)
    tokenizer = load_tokenizer(path)
    if tokenizer_dir and own:
        difference = tokenizer_difference(load_tokenizer(weight), tokenizer)
        if difference:
            raise SystemExit(f"{weight} ships its own tokenizer, and --tokenizer_dir {tokenizer_dir} is another one: "
                             f"{difference}. Leave out --tokenizer_dir to use the folder's.")
    return tokenizer, path


def tokenizer_difference(a, b):
    """How two tokenizers differ, in words: None when every token has the same id in both."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a == vocab_b:
        return None
    moved = sum(vocab_b.get(token) != i for token, i in vocab_a.items())
    tags = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")
    tags = ", ".join(f"{t} {vocab_a.get(t)} vs {vocab_b.get(t)}" for t in tags if vocab_a.get(t) != vocab_b.get(t))
    return (f"{moved} of its {len(vocab_a)} tokens have another id or none in the other ({len(vocab_b)} tokens)"
            + (f"; special tokens: {tags}" if tags else ""))


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# -- the record beside a weight ------------------------------------------------------------------------------------

TOKENIZER_FIELDS = ("tokenizer_dir", "vocab_hash", "chat_template_hash", "vocab_size")


def record_path(weight):
    """Where the record of a .pth lies: out/full_sft_512.pth -> out/full_sft_512.tokenizer.json."""
    return os.path.splitext(weight)[0] + ".tokenizer.json"


def tokenizer_fields(tokenizer, tokenizer_dir):
    """What a record says of a tokenizer: its folder, the hashes of its vocabulary and chat template, its size."""
    return dict(tokenizer_dir=os.path.abspath(tokenizer_dir), vocab_hash=tokenizer_id(tokenizer),
                chat_template_hash=template_id(tokenizer), vocab_size=len(tokenizer))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_record(weight, fields, generation):
    """Write the record of a .pth just saved: the tokenizer it was trained with (fields: tokenizer_fields(...), or
    those of another record) and the model generation, tied to the file by its hash, so that a .pth replaced later
    is not taken for the one described. Written whole or not at all."""
    record = dict(weight=os.path.basename(weight), weight_sha256=file_sha256(weight), generation=generation,
                  **{k: fields[k] for k in TOKENIZER_FIELDS})
    atomic_write_text(record_path(weight), json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def read_record(weight):
    """The record beside a .pth, or None: there is none (a weight from elsewhere, or one saved before records
    existed), or it describes another file (the .pth was replaced after the record was written: said, and left
    aside)."""
    path = record_path(weight)
    if not os.path.isfile(weight) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        missing = [k for k in ("weight_sha256", *TOKENIZER_FIELDS) if k not in record]
    except (ValueError, TypeError) as e:
        missing = [str(e)]
    if missing:
        raise SystemExit(f"{path} is not a tokenizer record (missing: {', '.join(missing)}): delete it to have "
                         f"{weight} probed instead")
    if record["weight_sha256"] != file_sha256(weight):
        print(f"note: {path} describes another file than {weight} (the weight changed after the record was "
              "written): the record is left aside", file=sys.stderr, flush=True)
        return None
    return record


def check_recorded(weight, tokenizer, tokenizer_dir, chosen=False):
    """Compare the record beside a .pth with the tokenizer in use: True when they agree, False when there is no
    record. Another vocabulary stops the load, whatever was asked (the ids would mean other text); another chat
    template too, unless the tokenizer was chosen (--tokenizer_dir), which makes it a warning (the ids agree, and
    conversations are laid out otherwise than the weight learnt them)."""
    record = read_record(weight)
    if record is None:
        return False
    in_use = tokenizer_fields(tokenizer, tokenizer_dir)
    recorded, using = (f"{r['tokenizer_dir']} (vocabulary {r['vocab_hash']}, {r['vocab_size']} tokens; chat "
                       f"template {r['chat_template_hash']})" for r in (record, in_use))
    said = f"{weight} was trained with the tokenizer in {recorded}, as {record_path(weight)} records, and this load"
    if record["vocab_hash"] != in_use["vocab_hash"]:
        raise SystemExit(f"{said} uses the one in {using}: the token ids would mean other text. "
                         f"{how_to_name(record)} (If the record is wrong, delete it: the weight is then probed.)")
    if record["chat_template_hash"] != in_use["chat_template_hash"]:
        message = (f"{said} uses the one in {using}: the same token ids, but another chat template, so "
                   "conversations would be laid out otherwise than the weight learnt them.")
        if not chosen:
            raise SystemExit(f"{message} {how_to_name(record)}")
        warn(message)
    return True


def how_to_name(record):
    """The flag that pairs a weight with its recorded tokenizer, if the recorded folder still holds it."""
    folder = record["tokenizer_dir"]
    if has_tokenizer(folder):
        there = tokenizer_fields(load_tokenizer(folder), folder)
        if all(there[k] == record[k] for k in ("vocab_hash", "chat_template_hash")):
            return f"Pass --tokenizer_dir {folder}."
    return (f"{folder} no longer holds that tokenizer: pass --tokenizer_dir a folder that does (the tokenizer the "
            "weight was trained with).")


# -- a weight without a record: the probe --------------------------------------------------------------------------

# Plain Chinese and English, the languages every MiniMind is trained on: a weight read with the tokenizer it was
# trained with predicts it better than uniform guessing; read with another, it confidently predicts the wrong ids.
PROBE_TEXT = ("人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。今天天气很好，我们一起去公园散步吧。"
              "The sun rises in the east and sets in the west. Reading books is a good way to learn new things.")
CLEARLY = 1.0  # nats a token: how much lower one probe loss must be than the others to tell which tokenizer it is
MAX_COMPARED = 8  # other tokenizers probed at most


@torch.no_grad()
def probe_loss(model, tokenizer):
    """Mean next-token cross-entropy of the model on PROBE_TEXT as the tokenizer encodes it (bos first, as in
    pretraining)."""
    ids = tokenizer((tokenizer.bos_token or "") + PROBE_TEXT, add_special_tokens=False).input_ids
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([ids], device=device)).logits.float()
    finally:
        model.train(was_training)
    return torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:], device=device)).item()


def tokenizers_to_compare(weight, tokenizer_dir):
    """The other tokenizer folders a user could name for a weight: model/, and those beside the weight (its own
    folder, the folders in it and next to it - a released model folder cloned beside its .pth files - and in the
    repository root), at most MAX_COMPARED."""
    folder = os.path.dirname(os.path.abspath(weight))
    places = [PROJECT_TOKENIZER, folder]
    for parent in (folder, os.path.dirname(folder), REPO_ROOT):
        try:
            places += [os.path.join(parent, name) for name in sorted(os.listdir(parent))]
        except OSError:
            pass
    seen, found = {os.path.realpath(tokenizer_dir)}, []
    for place in places:
        if os.path.realpath(place) not in seen and has_tokenizer(place):
            seen.add(os.path.realpath(place))
            found.append(place)
    return found[:MAX_COMPARED]


def probe_tokenizers(model, tokenizer, tokenizer_dir, weight, chosen=False):
    """Which tokenizer a .pth without a record reads: its loss on PROBE_TEXT as the tokenizer in use encodes it,
    beside the loss as each other tokenizer the user could name encodes it (tokenizers_to_compare) and the loss of
    uniform guessing (a weight that reads no tokenizer). The one clearly lower than all the rest (by CLEARLY) wins:
      another tokenizer                -> stop, naming it;
      uniform guessing (it reads none) -> stop;
      the tokenizer in use             -> go on;
      none clearly lower               -> go on, with a note: a weight that has learnt little (random, or the first
                                          steps of a run) reads every tokenizer about alike.
    A tokenizer chosen with --tokenizer_dir turns a stop into a warning: the one who names it may know better."""
    vocab_size = model.config.vocab_size
    own, uniform = probe_loss(model, tokenizer), math.log(vocab_size)
    others, seen = {}, {tokenizer_id(tokenizer)}
    for folder in tokenizers_to_compare(weight, tokenizer_dir):
        try:
            other = load_tokenizer(folder)
        except Exception:  # a folder whose tokenizer transformers cannot read is no candidate
            continue
        if len(other) <= vocab_size and tokenizer_id(other) not in seen:  # each vocabulary once
            seen.add(tokenizer_id(other))
            others[folder] = probe_loss(model, other)
    best = min(others, key=others.get, default=None)
    found = (f"it has no record of its tokenizer ({record_path(weight)}), so it was probed: on a plain sentence its "
             f"loss is {own:.1f} nats a token with this tokenizer, "
             + "".join(f"{loss:.1f} with the one in {folder}, " for folder, loss in others.items())
             + f"{uniform:.1f} guessing uniformly")
    stop = f"{weight} does not read the token ids of the tokenizer in {tokenizer_dir}: {found}."
    if best is not None and others[best] < own - CLEARLY:
        message = f"{stop} It reads the tokenizer in {best}: pass --tokenizer_dir {best}."
    elif own > uniform + CLEARLY:
        message = (f"{stop} It reads none of these. A weight needs the tokenizer it was trained with: a released "
                   "minimind-3 weight the one in its model folder (--tokenizer_dir path/to/minimind-3), a weight "
                   "trained here the one its run used (model/ unless --tokenizer_dir said otherwise).")
    elif own < min([uniform, *others.values()]) - CLEARLY:
        return
    else:
        print(f"note: the probe cannot confirm that {weight} reads the tokenizer in {tokenizer_dir}: {found}. A "
              "weight that has learnt little (random, or the first steps of a run) reads every tokenizer about "
              "alike; going on.", file=sys.stderr, flush=True)
        return
    if not chosen:
        raise SystemExit(f"{message} To load it with this tokenizer all the same, name it: --tokenizer_dir "
                         f"{tokenizer_dir}")
    warn(message)


# -- every load ----------------------------------------------------------------------------------------------------

def check_finite(model, weight):
    """Stop on a weight that holds nan or inf, said as such: no tokenizer makes it work."""
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise SystemExit(f"{weight} holds non-finite values (nan or inf) in {len(bad)} of its tensors "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the weight itself is broken, "
                         "whatever the tokenizer. Load another checkpoint (an earlier one of the run that wrote it).")


def check_tokenizer_fits(model, tokenizer, tokenizer_dir, weight, chosen=False):
    """Say so when a weight is broken, or paired with a tokenizer it was not trained with (the ids would mean other
    text and every answer would be garbage). chosen: the tokenizer was named (--tokenizer_dir). In order:
      a weight holding nan or inf stops the load;
      a model folder's own tokenizer is the one it was trained with: nothing more to check;
      a .pth with a record: the record and the tokenizer in use must agree (check_recorded);
      a tokenizer larger than the weight's vocabulary stops the load;
      a .pth without a record is probed (probe_tokenizers)."""
    check_finite(model, weight)
    if tokenizer_dir == weight:
        return
    if check_recorded(weight, tokenizer, tokenizer_dir, chosen):
        return
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens and {weight} only "
                         f"{vocab_size} embedding rows: they do not belong together")
    probe_tokenizers(model, tokenizer, tokenizer_dir, weight, chosen)
