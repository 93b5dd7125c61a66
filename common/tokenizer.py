"""Which tokenizer a weight reads. A .pth records no tokenizer, so the rule is: --tokenizer_dir, else the one a
model folder ships, else model/ (this project's); a weight is then probed on a plain sentence, since one read with
the wrong tokenizer predicts it worse than uniform guessing. Used by the trainers and the chat/serving code alike."""
import hashlib
import json
import math
import os
import sys

import torch

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


# Plain Chinese and English, the languages every MiniMind is trained on: a weight read with the tokenizer it was
# trained with predicts it better than uniform guessing; read with another, it confidently predicts the wrong ids.
PROBE_TEXT = ("人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。今天天气很好，我们一起去公园散步吧。"
              "The sun rises in the east and sets in the west. Reading books is a good way to learn new things.")


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


def check_tokenizer_fits(model, tokenizer, tokenizer_dir, weight, chosen=False):
    """Say so when a weight is paired with a tokenizer it was not trained with (the ids would mean other text and
    every answer would be garbage): a tokenizer larger than the weight's vocabulary stops the load; so does one whose
    encoding of PROBE_TEXT the weight predicts worse than uniform guessing by a nat, unless the tokenizer was chosen
    (--tokenizer_dir), which turns that into a warning: a weight that reads no text at all (random, or barely
    trained and confident) looks the same, and the one who names the tokenizer knows which it is."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens and {weight} only "
                         f"{vocab_size} embedding rows: they do not belong together")
    loss, uniform = probe_loss(model, tokenizer), math.log(vocab_size)
    if loss <= uniform + 1.0:
        return
    message = (f"{weight} does not read the token ids of the tokenizer in {tokenizer_dir}: on a plain sentence its "
               f"loss is {loss:.1f} nats a token, worse than guessing uniformly ({uniform:.1f}). A weight needs the "
               "tokenizer it was trained with: a released minimind-3 weight the one in its model folder "
               "(--tokenizer_dir path/to/minimind-3), a weight trained here the one its run used (model/ unless "
               "--tokenizer_dir said otherwise).")
    if not chosen:
        raise SystemExit(message + " To load it with this tokenizer all the same, name it: --tokenizer_dir "
                         f"{tokenizer_dir}")
    print(f"warning: {message}", file=sys.stderr, flush=True)
