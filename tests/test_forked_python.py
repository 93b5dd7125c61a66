"""tests/forked_python.py: a run forked from the zygote behaves as `python script.py ...` would."""
import os
import subprocess
import sys

import pytest

from forked_python import forked_run, run_python

SCRIPT = """import json, os, sys
print(json.dumps(dict(argv=sys.argv, cwd=os.getcwd(), name=__name__, path0=sys.path[0], env=os.environ.get("PROBE"),
                      stdin=sys.stdin.read(), torch="torch" in sys.modules)))
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["fail"]:
    raise ValueError("broken on purpose")
if sys.argv[1:] == ["sleep"]:
    import time
    time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
"""


@pytest.fixture
def script(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "probe.py"
    path.write_text(SCRIPT, encoding="utf-8")
    return path


def test_a_forked_run_is_the_script_run_as_main(script, tmp_path):
    import json
    result = run_python([os.path.join("sub", "probe.py"), "3"], cwd=tmp_path, env=dict(os.environ, PROBE="yes"),
                        input="fed in")
    seen = json.loads(result.stdout)
    assert result.returncode == 3 and result.stderr == "to stderr\n"
    assert seen["argv"] == [os.path.join("sub", "probe.py"), "3"] and seen["cwd"] == str(tmp_path)
    assert seen["name"] == "__main__" and seen["path0"] == str(script.parent)  # as `python sub/probe.py` sets
    assert seen["env"] == "yes" and seen["stdin"] == "fed in" and seen["torch"]  # torch came imported
    plain = subprocess.run([sys.executable, os.path.join("sub", "probe.py"), "3"], cwd=tmp_path, text=True,
                           capture_output=True, env=dict(os.environ, PROBE="yes"), input="fed in")
    assert plain.returncode == 3 and {**json.loads(plain.stdout), "torch": True} == seen


def test_an_environment_torch_reads_at_import_gets_a_fresh_interpreter(script, tmp_path, monkeypatch):
    import json
    seen = json.loads(run_python([str(script)], cwd=tmp_path, env=dict(os.environ, TORCH_LOGS="graph_breaks")).stdout)
    assert not seen["torch"]  # not forked: the zygote's torch was imported without TORCH_LOGS
    assert json.loads(run_python([str(script)], cwd=tmp_path, env=dict(os.environ, OTHER="1")).stdout)["torch"]
    # libraries write their defaults into the tests' own environment (torch.compile: TORCHINDUCTOR_CACHE_DIR, trl:
    # KMP_DUPLICATE_LIB_OK); runs that merely inherit them are still forked
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "True")
    assert json.loads(run_python([str(script)], cwd=tmp_path, env=dict(os.environ)).stdout)["torch"]


def test_an_uncaught_exception_exits_1_with_its_traceback(script, tmp_path):
    result = run_python([str(script), "fail"], cwd=tmp_path)
    assert result.returncode == 1 and "ValueError: broken on purpose" in result.stderr and "Traceback" in result.stderr


def test_a_run_past_its_timeout_is_killed_and_the_next_run_works(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([str(script), "sleep"], cwd=tmp_path, timeout=2)
    assert run_python([str(script)], cwd=tmp_path).returncode == 0


def test_forked_run_passes_other_commands_to_subprocess(script, tmp_path, capfd):
    assert forked_run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"
    with pytest.raises(subprocess.CalledProcessError):
        forked_run([sys.executable, str(script), "2"], cwd=tmp_path, check=True)
    forked_run([sys.executable, str(script)], cwd=tmp_path, check=True)  # uncaptured: written to our streams
    assert "to stderr" in capfd.readouterr().err
