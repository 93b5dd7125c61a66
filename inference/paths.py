"""Which weight a command line or the web chat means: the model flags eval_llm.py, the server and the evaluators
share, MiniMind's weight names, and the chat models found in a folder. Imports nothing heavy (a script answers
--help before torch loads)."""
import json
import os
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# out/{weight}_{hidden}[_moe].pth, the names the training stages write
WEIGHT_NAME = re.compile(r"^(?P<weight>.+)_(?P<hidden>\d+)(?P<moe>_moe)?\.pth$")


def add_model_arguments(parser):
    """The flags that choose a model, shared by eval_llm.py, the server and the benchmark evaluator."""
    parser.add_argument("--load_from", default="model", help="'model' = out/{weight}_{hidden}[_moe].pth from "
                                                            "--save_dir; otherwise a .pth file or a transformers folder")
    parser.add_argument("--save_dir", default=os.path.join(REPO_ROOT, "out"))
    parser.add_argument("--weight", default="full_sft", help="out/{weight}_{hidden}[_moe].pth")
    parser.add_argument("--lora_weight", default="None",
                        help="a name: out/lora/{name}_{hidden}.pth (this project's layout) or out/{name}_{hidden}.pth "
                             "(MiniMind's), whichever exists; or a path")
    parser.add_argument("--lora_alpha", type=float, default=None, help="as used in training (default: none)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8,
                        help="accepted for MiniMind's command lines; the depth is read off the checkpoint")
    parser.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    parser.add_argument("--inference_rope_scaling", action="store_true", help="YaRN: 16x longer context")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="tokenizer folder (default: the one a model folder ships, else model/, this project's)")
    # "%(default).0s" prints nothing: it only stops the help formatter from adding "(default: None)"
    parser.add_argument("--device", default=None, help="cuda / cuda:1 / mps / cpu (default: the best available)%(default).0s")


def resolve_paths(args):
    """(model path, LoRA path or None) from the command-line flags eval_llm.py and the server share:
    --load_from (a folder or .pth; 'model' = out/{weight}_{hidden}[_moe].pth), --lora_weight (a path, or a name:
    lora_file)."""
    if args.load_from != "model":
        if not os.path.exists(args.load_from):
            raise SystemExit(f"--load_from {args.load_from} does not exist (expected a model folder or a .pth file)")
        path = args.load_from
        config_file = os.path.join(path, "config.json")
        hidden = json.load(open(config_file))["hidden_size"] if os.path.isfile(config_file) else args.hidden_size
    else:
        path = os.path.join(args.save_dir, f"{args.weight}_{args.hidden_size}{'_moe' if args.use_moe else ''}.pth")
        if not os.path.exists(path):
            present = sorted(f for f in os.listdir(args.save_dir) if f.endswith(".pth")) if os.path.isdir(args.save_dir) else []
            raise SystemExit(f"{path} does not exist; {args.save_dir} holds: {', '.join(present) or 'no .pth files'}"
                             f"{demo_hint(args)}")
        hidden = args.hidden_size
    lora_path = None
    if args.lora_weight != "None":
        lora_path = lora_file(args.save_dir, args.lora_weight, hidden, getattr(args, "use_moe", 0))
    return path, lora_path


def lora_file(save_dir, name, hidden, use_moe=0):
    """The LoRA file --lora_weight names: the path itself when it exists; else, for a name, the first of
    out/lora/{name}_{hidden}.pth (where train_lora.py writes it) and out/{name}_{hidden}.pth (where MiniMind's
    writes it; with _moe after the size for a MoE model) that exists. Neither: an error naming both."""
    if os.path.exists(name):
        return name
    sizes = [f"{hidden}_moe", f"{hidden}"] if use_moe else [f"{hidden}"]
    candidates = [os.path.join(save_dir, "lora", f"{name}_{hidden}.pth")] + \
        [os.path.join(save_dir, f"{name}_{size}.pth") for size in sizes]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise SystemExit(f"--lora_weight {name}: no LoRA file at {' or '.join(candidates)} (train one with "
                         "trainer/train_lora.py, or pass the file's path)")
    return found


def demo_hint(args):
    """When the asked-for weight is missing but scripts/run_demo.py left weights in out/demo: the exact
    command line that uses them (that stage if the demo has it, else its last chat stage)."""
    demo = os.path.join(REPO_ROOT, "out", "demo")
    if os.path.abspath(args.save_dir) == demo:
        return ""
    weights = {m["weight"]: m for m in (WEIGHT_NAME.match(os.path.basename(p)) for p in find_local_models(demo)) if m}
    pick = args.weight if args.weight in weights else \
        next((w for w in CHAT_STAGES if w in weights), None)
    if pick is None:
        return ""
    found = weights[pick]
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())
    return (f"\nThe demo's weights are in out/demo; to use them: python {script} --save_dir out/demo --weight {pick} "
            f"--hidden_size {found['hidden']}{' --use_moe 1' if found['moe'] else ''}")


def find_local_models(*folders):
    """Native weights (*.pth outside lora/) and transformers folders (with config.json) in the folders."""
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if WEIGHT_NAME.match(entry) and not entry.endswith("_resume.pth"):
                found.append(path)
            elif os.path.isfile(os.path.join(path, "config.json")):
                found.append(path)
    return found


# Weights that answer chats, later stages of the pipeline first.
CHAT_STAGES = ("grpo", "spo", "ppo_actor", "reason", "dpo", "full_sft", "full_dist")


def newest_chat_model(paths):
    """Index of the newest chat model (a weight of a stage from SFT on) among the paths, else 0."""
    chat = [p for p in paths if (m := WEIGHT_NAME.match(os.path.basename(p))) and m["weight"] in CHAT_STAGES]
    return paths.index(max(chat, key=os.path.getmtime)) if chat else 0
