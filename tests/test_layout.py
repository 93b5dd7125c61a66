"""The house rules of the layout: one import form (absolute, from the repository root), imports that flow from the
entry scripts down to the model and never up, and --help answered before torch loads."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PACKAGES = ("common", "model", "dataset", "trainer", "inference", "scripts")
# A package may import only the packages below it: common < model, dataset < inference < trainer < scripts (the
# trainer's agent stage uses the chat library's tools and call parsing; the chat library never imports the trainer).
LAYER = {"common": 0, "model": 1, "dataset": 1, "inference": 2, "trainer": 3, "scripts": 4}
ENTRY_SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "trainer", "train_*.py"))) + \
    [os.path.join(REPO_ROOT, "eval_llm.py")] + \
    sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "scripts", "*.py"))
           if os.path.basename(p) not in ("__init__.py", "web_demo.py"))  # the web chat runs under streamlit


def project_files():
    files = [os.path.join(REPO_ROOT, "eval_llm.py")]
    for package in PACKAGES:
        files += sorted(glob.glob(os.path.join(REPO_ROOT, package, "*.py")))
    return files


def imports_of(path):
    """(line, module name, level) of every import statement in the file, nested ones included."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def test_every_project_import_is_absolute_and_flows_down():
    module_names = {os.path.basename(p)[:-3] for p in project_files()} - {"__init__"}
    problems = []
    for path in project_files():
        rel = os.path.relpath(path, REPO_ROOT)
        package = rel.split(os.sep)[0] if os.sep in rel else None
        for line, module, level in imports_of(path):
            top = module.split(".")[0]
            if level:  # the model's own kernels, so that save_pretrained copies kernels.py beside it
                if rel != os.path.join("model", "model_minimind.py"):
                    problems.append(f"{rel}:{line}: relative import of {module}")
            elif top in module_names and top not in PACKAGES:
                problems.append(f"{rel}:{line}: 'import {module}' names a project module without its package")
            elif top in PACKAGES and package in LAYER and LAYER[top] >= LAYER[package] and top != package:
                problems.append(f"{rel}:{line}: {package}/ imports {top}/, which is not below it")
            elif top == "trainer" and module.split(".")[-1].startswith("train_"):
                problems.append(f"{rel}:{line}: imports the training script {module}")
    assert not problems, "\n".join(problems)


def test_only_entry_scripts_edit_sys_path_and_each_has_main():
    for path in project_files():
        source = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, REPO_ROOT)
        entry = 'if __name__ == "__main__"' in source
        if not entry:
            assert "sys.path" not in source, f"{rel} is a library module and edits sys.path"
        elif rel != os.path.join("scripts", "build_demo_data.py"):  # that one also adds a vendored opencc folder
            assert source.count("sys.path.insert") <= 1, f"{rel} edits sys.path more than once"
        if entry:
            assert "\ndef main(" in source, f"{rel} has no main()"


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_help_is_answered_before_torch_loads(script, tmp_path):
    """`python SCRIPT --help` from any folder prints the options without importing torch, transformers or datasets
    (which take seconds): the arguments are parsed first."""
    # -X importtime lists every module the interpreter imports, one line each, on stderr
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"torch", "transformers", "datasets"}


def test_the_command_line_knows_every_generation():
    from model.model_minimind import GENERATIONS
    from trainer.args import GENERATION_NAMES
    assert GENERATION_NAMES == tuple(sorted(GENERATIONS))


@pytest.mark.parametrize("package", ["common", "inference", "trainer", os.path.join("trainer", "rl")])
def test_each_folder_map_names_every_file_of_its_folder(package):
    """A package's docstring is its folder map: it names each of its modules, so none is left out of the overview."""
    folder = os.path.join(REPO_ROOT, package)
    with open(os.path.join(folder, "__init__.py"), encoding="utf-8") as f:
        overview = ast.get_docstring(ast.parse(f.read())) or ""
    modules = [name for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py"]
    subpackages = [name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, "__init__.py"))]
    missing = [name for name in modules if name not in overview] + \
        [name for name in subpackages if f"{name}/" not in overview]
    assert not missing, f"{package}/__init__.py does not name {missing}"
