"""`python script.py args` for the tests, without paying the imports each time.

About a hundred tests run a trainer or a tool as its own process. Each such process used to spend 3-6 s importing torch
and transformers before its first line of work. Here one helper process (the "zygote") imports them once and forks a
child for every run: the child is still a process of its own (own memory, cwd, environment, sys.argv, exit code,
stdout and stderr files), runs the script as __main__ with runpy, and starts with torch and transformers already
imported, as if they had been imported first. Nothing else is imported in the zygote (not the project, not datasets,
whose cache folder is read from the environment at import), and it runs no torch op, so no thread pool is forked.
A run whose environment differs from the zygote's in a variable that torch or transformers read at import (TORCH_LOGS,
OMP_NUM_THREADS, HF_HUB_OFFLINE, ...) is started as a plain subprocess instead.

    result = run_python(["trainer/train_pretrain.py", "--max_steps", "1"], cwd=..., env=..., timeout=600)
    result.returncode, result.stdout, result.stderr       # as subprocess.run(..., capture_output=True, text=True)

Runs that need a real interpreter of their own (torchrun, signals sent from outside, `-m` modules) keep using
subprocess. Scripts that start trainers themselves (run_demo.py, gpu_check.py) are tested in-process with
`subprocess.run` patched to `forked_run`, which sends `[python, script, ...]` commands here and anything else on.
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

READ_AT_IMPORT = ("TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "ONEDNN_", "ATEN_", "TRANSFORMERS", "HF_HUB", "HF_HOME",
                  "TOKENIZERS")  # prefixes of the variables the preloaded modules read once, at import
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.masking_utils", "transformers.cache_utils", "transformers.modeling_outputs")


def _child(request):
    """In the forked child: become `python script args` in cwd with env, run it, exit with its code."""
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.dup2(os.open(request["stdin"] or os.devnull, os.O_RDONLY), 0)
    os.setsid()  # its own process group: a timeout kills it and whatever it started
    import runpy
    import traceback
    code = 0
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py`: the script's folder first
        runpy.run_path(sys.argv[0], run_name="__main__")  # __file__ and argv[0] as given, as python sets them
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def zygote_main():
    """The zygote: import, then fork one child per JSON request read from stdin; answer its pid, then its status."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class _Zygote:
    def __init__(self):
        self.lock = threading.Lock()
        self.process, self.env = None, {}

    def start(self):
        self.env = dict(os.environ)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.process.stdout.readline().strip() == "ready", "the test zygote did not start"

    def read_line(self, timeout):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline().strip() if ready else None

    def imports_differently(self, env):
        """Whether this run gives a variable that torch or transformers read at import another value than the zygote
        imported with. What the tests' own process changed since does not count (libraries write their defaults
        there at run time: torch.compile's TORCHINDUCTOR_CACHE_DIR, trl's KMP_DUPLICATE_LIB_OK); a value the caller
        sets for this run does."""
        keys = {k for k in set(env) | set(self.env) if k.startswith(READ_AT_IMPORT)}
        return any(env.get(k) != self.env.get(k) and env.get(k) != os.environ.get(k) for k in keys)

    def run(self, argv, cwd, env, timeout, input):
        with self.lock, tempfile.TemporaryDirectory() as folder:
            if self.process is None or self.process.poll() is not None:
                self.start()
            if self.imports_differently(env):  # a fresh interpreter imports torch with this environment
                return _real_run([sys.executable, *argv], cwd=cwd, env=env, input=input, capture_output=True,
                                 text=True, timeout=timeout)
            paths = dict(stdout=os.path.join(folder, "out"), stderr=os.path.join(folder, "err"), stdin=None)
            if input is not None:
                paths["stdin"] = os.path.join(folder, "in")
                with open(paths["stdin"], "w", encoding="utf-8") as f:
                    f.write(input)
            self.process.stdin.write(json.dumps(dict(argv=list(argv), cwd=str(cwd), env=dict(env), **paths)) + "\n")
            pid = int(self.read_line(60))
            status = self.read_line(timeout)
            if status is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
                self.read_line(60)
            with open(paths["stdout"], encoding="utf-8", errors="replace") as f:
                stdout = f.read()
            with open(paths["stderr"], encoding="utf-8", errors="replace") as f:
                stderr = f.read()
            if status is None:
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
            return subprocess.CompletedProcess([sys.executable, *argv], int(status), stdout, stderr)


_zygote = _Zygote()


def run_python(argv, cwd=None, env=None, timeout=600, input=None):
    """subprocess.run([python, *argv], cwd=cwd, env=env, input=input, capture_output=True, text=True,
    timeout=timeout), forked from the zygote. argv[0] is a script path (absolute, or relative to cwd)."""
    return _zygote.run(argv, cwd or os.getcwd(), os.environ if env is None else env, timeout, input)


_real_run = subprocess.run


def forked_run(command, *args, **kwargs):
    """subprocess.run for [sys.executable, script.py, ...] through the zygote; any other command, or an argument
    this does not handle, goes to the real subprocess.run."""
    handled = {"cwd", "env", "timeout", "input", "capture_output", "text", "check"}
    if (not isinstance(command, (list, tuple)) or len(command) < 2 or command[0] != sys.executable
            or str(command[1]).startswith("-") or args or set(kwargs) - handled
            or (kwargs.get("capture_output") and not kwargs.get("text"))):
        return _real_run(command, *args, **kwargs)
    result = run_python([str(c) for c in command[1:]], cwd=kwargs.get("cwd"), env=kwargs.get("env"),
                        timeout=kwargs.get("timeout") or 3600, input=kwargs.get("input"))
    if not kwargs.get("capture_output"):  # the caller's output streams, as an uncaptured child would write to them
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        result.stdout = result.stderr = None
    if kwargs.get("check") and result.returncode:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result


if __name__ == "__main__":
    zygote_main()
