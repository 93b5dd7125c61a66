import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

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
