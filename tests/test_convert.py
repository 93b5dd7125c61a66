"""scripts/convert_model.py: native <-> transformers folder round trips and the plain-Llama export."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT
from forked_python import run_python
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

SCRIPT = os.path.join(REPO_ROOT, "scripts", "convert_model.py")


def native_weight(path, use_moe=False, seed=0):
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=use_moe))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    model.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True).items()})
    return model.eval()


def convert(*args):
    result = run_python([SCRIPT, *args], timeout=300)
    return result


def left_padded_batch():
    ids = torch.randint(3, 6400, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("use_moe", [False, True])
def test_native_to_transformers_and_back_round_trip_exactly(tmp_path, use_moe):
    native = native_weight(tmp_path / "full_sft_64.pth", use_moe)
    # no size flags: depth, width and experts are read off the checkpoint
    assert convert("to_transformers", str(tmp_path / "full_sft_64.pth"), str(tmp_path / "hf")).returncode == 0
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "model_minimind.py", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["model_type"] == "minimind" and config["auto_map"]["AutoModelForCausalLM"].startswith("model_minimind.")
    for key, value in native.config.to_diff_dict().items():  # the config read off the tensors is the original one
        if key not in ("architectures", "auto_map", "dtype", "transformers_version"):
            assert config[key] == value, key
    folder_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(folder_model(ids, attention_mask=mask).logits, native(ids, attention_mask=mask).logits)
    assert convert("to_native", str(tmp_path / "hf"), str(tmp_path / "back.pth")).returncode == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    original = torch.load(tmp_path / "full_sft_64.pth", weights_only=True)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_llama_export_matches_the_native_model(tmp_path):
    native = native_weight(tmp_path / "full_sft_64.pth")
    result = convert("to_llama", str(tmp_path / "full_sft_64.pth"), str(tmp_path / "llama"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.load(open(tmp_path / "llama" / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not os.path.exists(tmp_path / "llama" / "model_minimind.py")  # no remote code needed
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        diff = (llama(ids, attention_mask=mask).logits - native(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4


def test_moe_llama_export_is_refused(tmp_path):
    native_weight(tmp_path / "full_sft_64.pth", use_moe=True)
    result = convert("to_llama", str(tmp_path / "full_sft_64.pth"), str(tmp_path / "llama"))
    assert result.returncode != 0 and "MoE MiniMind has no Llama equivalent" in result.stderr
    assert not os.path.exists(tmp_path / "llama")


def test_eval_llm_chats_with_a_converted_folder(tmp_path):
    native_weight(tmp_path / "full_sft_64.pth")
    assert convert("to_transformers", str(tmp_path / "full_sft_64.pth"), str(tmp_path / "hf")).returncode == 0
    result = run_python([os.path.join(REPO_ROOT, "eval_llm.py"), "--load_from", str(tmp_path / "hf"),
                         "--prompts", "你好", "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "🤖:" in result.stdout and "tokens/s]" in result.stdout


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    """A tiny native weight converted once to a transformers folder, shared by the interop tests."""
    tmp = tmp_path_factory.mktemp("interop")
    native_weight(tmp / "full_sft_64.pth")
    result = convert("to_transformers", str(tmp / "full_sft_64.pth"), str(tmp / "hf"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    return str(tmp / "hf")


def test_converted_folder_runs_in_a_text_generation_pipeline(converted_folder):
    from transformers import pipeline
    generator = pipeline("text-generation", model=converted_folder, trust_remote_code=True, device="cpu")
    messages = [{"role": "user", "content": "你好"}]
    first = generator(messages, max_new_tokens=6, do_sample=False)
    again = generator(messages, max_new_tokens=6, do_sample=False)
    reply = first[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and first == again  # greedy: deterministic
    # the pipeline rendered the chat template of the folder's tokenizer and generated at most 6 tokens
    assert len(generator.tokenizer(reply["content"], add_special_tokens=False).input_ids) <= 6


def test_peft_lora_trains_on_the_converted_folder(converted_folder):
    from peft import LoraConfig, get_peft_model
    model = AutoModelForCausalLM.from_pretrained(converted_folder, trust_remote_code=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_trl_sft_trainer_runs_two_steps_on_the_converted_folder(converted_folder, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from transformers import AutoTokenizer
    data = load_dataset("json", data_files=os.path.join(REPO_ROOT, "dataset", "demo", "sft.jsonl"),
                        split="train[:16]", cache_dir=str(tmp_path / "hf_cache"))
    data = data.rename_column("conversations", "messages")  # trl's conversational column name
    model = AutoModelForCausalLM.from_pretrained(converted_folder, trust_remote_code=True)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                       max_length=64, learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                       use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(converted_folder))
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
