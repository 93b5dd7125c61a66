import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

# The project's tokenizer, named explicitly wherever a test loads a talkative_weight: a random weight reads no
# tokenizer's text, so the loaders' tokenizer probe would stop it; naming the tokenizer makes that a warning.
PROJECT_TOKENIZER = os.path.join(REPO_ROOT, "model")

# hidden 64, 2 layers: every test model builds and runs in milliseconds on a CPU.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)


def tiny_config(**overrides) -> MiniMindConfig:
    return MiniMindConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def repo_root():
    return REPO_ROOT


def talkative_weight(path, seed: int = 0):
    """A native .pth of a random 64x2 model (MiniMind's default 8 / 2 heads) whose matrices are scaled
    up 20x, so greedy answers are varied text instead of one repeated token: what the serving tests need
    to tell answers apart. Saved in half precision like the trainers' weights. It reads no tokenizer (random), so
    whatever loads it names the tokenizer (PROJECT_TOKENIZER)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(20)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(command, url, log_path, env=None):
    """Start a long-running command (a server) and return it once `url` answers (any HTTP status)."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(240):
        if process.poll() is not None:
            raise AssertionError(open(log_path).read()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=2)
            return process
        except urllib.error.HTTPError:
            return process  # up, but wants a key
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{command[1]} did not start: " + open(log_path).read()[-3000:])


def start_server(tmp_path, *args, env=None):
    """scripts/serve_openai_api.py on a free localhost port: (process, base url) once it answers."""
    port = free_port()
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "serve_openai_api.py"), "--port", str(port),
               "--device", "cpu", *args]
    if "--tokenizer_dir" not in args:
        command += ["--tokenizer_dir", PROJECT_TOKENIZER]
    url = f"http://127.0.0.1:{port}"
    return start_process(command, url + "/v1/models", tmp_path / f"server_{port}.log", env=env), url
