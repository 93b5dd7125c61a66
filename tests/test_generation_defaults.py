"""Every stage's defaults follow --generation: MiniMind2's, or upstream minimind-3's. The README's table is the
specification (parsed here from README_en.md, so table and scripts cannot drift apart), and the README's minimind-3
commands parse, name data files the project knows, start each stage from a weight an earlier command wrote, and run."""
import glob
import importlib
import os
import re
import shlex
import signal

import pytest

from conftest import PROJECT_TOKENIZER, REPO_ROOT
from dataset.files import DEMO_STAND_INS, FILES
from trainer.args import data_file

TRAINER = os.path.join(REPO_ROOT, "trainer")
NOT_SETTINGS = {"chosen_for_you", "data_is_default"}  # what parse_args adds about the settings, not a setting
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(TRAINER, "train_*.py")))


def code_span(cell):
    """The cell's first `code span` as a list of command-line words ([] without one)."""
    found = re.search(r"`([^`]*)`", cell)
    return shlex.split(found.group(1)) if found else []


def defaults_table(readme="README_en.md"):
    """{script or "every": (MiniMind2's words, minimind-3's words)} from the table whose header names both
    generations."""
    with open(os.path.join(REPO_ROOT, readme), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and "`--generation minimind2`" in line
                 and "`--generation minimind-3`" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        _, _, command, minimind2, minimind3, _ = line.split("|")
        script = re.search(r"(train_\w+)\.py", command)
        rows[script.group(1) if script else "every"] = (code_span(minimind2), code_span(minimind3))
    return rows


TABLE = defaults_table()


def parsed(script, argv):
    """The script's own arguments() on argv, as a dict of settings."""
    return {k: v for k, v in vars(importlib.import_module(f"trainer.{script}").arguments(argv)).items()
            if k not in NOT_SETTINGS}


def named(words):
    """The options a command line names (this table writes each option by its own name, not an alias)."""
    return {w[2:] for w in words if w.startswith("--")}


@pytest.fixture(autouse=True)
def in_trainer(monkeypatch):
    """As the README runs them: from trainer/, where a typed ../dataset/x.jsonl is the default's file."""
    monkeypatch.chdir(TRAINER)


def test_the_table_has_a_row_for_every_stage_and_both_readmes_agree():
    assert sorted(set(TABLE) - {"every"}) == SCRIPTS
    assert defaults_table("README.md") == TABLE  # the Chinese README's table holds the same command lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_minimind2_defaults_are_the_tables(script):
    words = TABLE["every"][0] + TABLE[script][0]
    assert parsed(script, words) == parsed(script, [])  # typing the table's values changes nothing


@pytest.mark.parametrize("script", SCRIPTS)
def test_minimind3_defaults_are_the_tables(script):
    """The minimind-3 column after the MiniMind2 one (the later of two flags wins) is what --generation minimind-3
    gives, and the column names every option whose default differs from MiniMind2's."""
    minimind2, minimind3 = TABLE["every"][0] + TABLE[script][0], TABLE["every"][1] + TABLE[script][1]
    defaults = parsed(script, ["--generation", "minimind-3"])
    assert parsed(script, ["--generation", "minimind-3", *minimind2, *minimind3]) == defaults
    differ = {k for k, v in parsed(script, []).items() if defaults[k] != v} - {"generation"}
    assert differ <= named(minimind3), f"{script}: not in the README's minimind-3 column: {differ - named(minimind3)}"
    assert named(minimind2 + minimind3) <= set(defaults)  # no option the script lacks


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_given_wins_over_minimind3s_defaults(script):
    minimind2 = TABLE["every"][0] + TABLE[script][0]
    given = parsed(script, ["--generation", "minimind-3", *minimind2])
    alone = parsed(script, minimind2)
    assert {k: given[k] for k in named(minimind2)} == {k: alone[k] for k in named(minimind2)}


def test_minimind3_defaults_are_named_at_the_start_and_the_rl_stages_start_from_full_sft():
    from trainer import train_grpo
    args = train_grpo.arguments(["--generation", "minimind-3", "--beta", "0.5"])
    assert (args.from_weight, args.reasoning, args.loss_type, args.beta) == ("full_sft", 0, "cispo", 0.5)
    notes = "\n".join(args.chosen_for_you)
    assert "--learning_rate 3e-07" in notes and "the defaults of --generation minimind-3" in notes
    assert "--beta" not in notes  # typed, not filled in
    assert "--from_weight full_sft: the default with --reasoning 0" in notes


def test_ppo_and_distillation_take_upstreams_option_names():
    from trainer import train_distillation, train_ppo
    args = train_ppo.arguments(["--ppo_update_iters", "3", "--early_stop_kl", "0.1", "--mini_batch_size", "2"])
    assert (args.ppo_epochs, args.kl_stop, args.cliprange_value) == (3, 0.1, args.clip_epsilon)
    with pytest.raises(SystemExit):  # an update takes the step's whole rollouts: no smaller mini-batches
        train_ppo.arguments(["--mini_batch_size", "1"])
    args = train_distillation.arguments(["--from_student_weight", "a", "--from_teacher_weight", "b",
                                         "--student_use_moe", "1"])
    assert (args.from_weight, args.teacher_weight, args.use_moe, args.teacher_use_moe) == ("a", "b", 1, 1)
    args = train_distillation.arguments(["--generation", "minimind-3"])
    assert (args.use_moe, args.teacher_use_moe, args.student_hidden_size, args.teacher_hidden_size,
            args.teacher_num_layers) == (0, 1, 768, 768, 8)  # upstream's: the MoE teacher into the dense student


# ----------------------------------------------------------------------------------------------
# The README's minimind-3 commands
# ----------------------------------------------------------------------------------------------

def readme_commands(readme="README_en.md"):
    """[(block, [argv of each `python train_*.py` line])] for the README's bash blocks that train minimind-3, with
    continued lines joined and $T expanded; block is the block's text."""
    with open(os.path.join(REPO_ROOT, readme), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    found = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        t = re.search(r'^T="([^"]*)"', text, re.M)
        commands = [shlex.split(line.split("#")[0].replace("$T", t.group(1) if t else ""))[1:]
                    for line in text.splitlines() if line.startswith("python train_")]
        commands = [c for c in commands if "minimind-3" in c]
        if commands:
            found.append((text, commands))
    return found


COMMANDS = readme_commands()


def produced(args):
    """The weight name a stage writes (its save_weight, hidden size, MoE suffix); LoRA writes an adapter."""
    hidden = args.student_hidden_size if hasattr(args, "student_hidden_size") else args.hidden_size
    return f"{args.save_weight}_{hidden}{'_moe' if args.use_moe else ''}"


def test_the_readmes_minimind3_commands_parse_name_known_data_and_start_from_weights_written_before():
    assert len(COMMANDS) >= 2 and sum(len(c) for _, c in COMMANDS) >= 10
    for text, commands in COMMANDS:
        download = re.search(r"download_data\.py (.*)", text)
        written = set()
        for argv in commands:
            script = argv[0][:-3]
            args = importlib.import_module(f"trainer.{script}").arguments(argv[1:])
            assert args.generation == "minimind-3"
            name = os.path.basename(args.data_path)
            assert name in FILES, f"{argv}: {name} is not a file MiniMind's hubs hold (dataset/files.py)"
            assert name in DEMO_STAND_INS, f"{argv}: no demo stand-in of {name}'s format"
            if args.data_is_default:  # the full file, or the stand-in the stage then trains on
                assert os.path.exists(data_file(args)), argv
            if download:  # the block downloads every file its commands read
                assert name in download.group(1).split(), f"{argv}: {name} is not in the block's download line"
            starts = [(args.from_weight, args.hidden_size, args.use_moe)]
            if hasattr(args, "teacher_weight"):
                starts = [(args.from_weight, args.student_hidden_size, args.use_moe),
                          (args.teacher_weight, args.teacher_hidden_size, args.teacher_use_moe)]
            for weight, hidden, moe in starts:  # 'none', a released folder, or what an earlier command wrote
                if weight != "none" and not weight.startswith("../minimind-3"):
                    assert f"{weight}_{hidden}{'_moe' if moe else ''}" in written, \
                        f"{argv}: starts from {weight}_{hidden}, which no command before it writes"
            written.add(produced(args))


@pytest.fixture
def restore_signals():
    """The runs below install Ctrl-C / SIGTERM handlers (Run.steps) in this process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


TINY_RUN = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "48", "--batch_size", "2",
            "--max_steps", "1", "--num_workers", "0", "--dtype", "float32", "--tokenizer_dir", PROJECT_TOKENIZER]
PER_STAGE = {"train_grpo": ["--max_gen_len", "4", "--num_generations", "2"], "train_ppo": ["--max_gen_len", "4"],
             "train_spo": ["--max_gen_len", "4"],
             "train_distillation": ["--student_hidden_size", "64", "--student_num_layers", "2",
                                    "--teacher_hidden_size", "64", "--teacher_num_layers", "2"]}


def test_the_from_scratch_commands_run_in_order(tmp_path, monkeypatch, restore_signals):
    """The block that trains minimind-3 from scratch, each command as written plus tiny sizes, one step, the
    project's tokenizer (the block's is a released folder) and a few rows of the demo stand-in under the data file's
    own name: every stage finds the weight the one before wrote (GRPO its full_sft, distillation its MoE teacher).
    Not the agent stage: its prompts (the tools' descriptions) take seconds even at this size, and test_agent.py
    runs it end to end."""
    monkeypatch.setenv("MINIMIND_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    text, commands = next((text, commands) for text, commands in COMMANDS if "train_pretrain.py" in text)
    out = ["--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt")]
    for argv in [c for c in commands if c[0] != "train_agent.py"]:
        script = importlib.import_module(f"trainer.{argv[0][:-3]}")
        name = os.path.basename(script.arguments(argv[1:]).data_path)
        with open(os.path.join(REPO_ROOT, "dataset", DEMO_STAND_INS[name]), encoding="utf-8") as f:
            (tmp_path / name).write_text("".join(f.readlines()[:8]), encoding="utf-8")
        args = script.arguments([*argv[1:], *TINY_RUN, *PER_STAGE.get(argv[0][:-3], []), *out,
                                 "--data_path", str(tmp_path / name)])
        script.main(args)
        assert (tmp_path / "out" / f"{produced(args)}.pth").exists(), argv
