"""scripts/download_data.py, offline: the hub calls are replaced, nothing reaches the network."""
import builtins
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "download_data.py")
spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
dd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dd)


class FakeHub:
    """Stands in for a hub function: records each call and writes a small file where the hub would."""

    def __init__(self, content=b'{"text": "hi"}\n', error=None):
        self.calls, self.content, self.error = [], content, error

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        name = kwargs.get("filename") or kwargs["file_path"]
        path = os.path.join(kwargs["local_dir"], name)
        with open(path, "wb") as f:
            f.write(self.content)
        return path


@pytest.fixture
def hf(monkeypatch):
    import huggingface_hub
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def fake_fetcher(calls, content=b"data\n", error=None):
    def fetch(name, out_dir, force=False, endpoint=None):
        calls.append((name, out_dir, force, endpoint))
        if error:
            raise error
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
    return {"huggingface": fetch, "modelscope": fetch}


def test_known_files_table():
    assert len(dd.FILES) == 17  # MiniMind2's ten files and minimind-3's seven new names
    assert dd.FILES["sft_t2t_mini.jsonl"][0] == "1.6 GB" and "minimind-3" in dd.FILES["agent_rl.jsonl"][1]
    assert dd.FILES["pretrain_hq.jsonl"] == ("1.6 GB", "pretrain")
    assert dd.FILES["rlaif-mini.jsonl"][1] == "PPO/GRPO/SPO"
    assert dd.check_names(["pretrain_hq.jsonl", "sft_mini_512.jsonl"]) == ["pretrain_hq.jsonl", "sft_mini_512.jsonl"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        dd.check_names(["pretrain_hq.jsonl", "nope.jsonl"])
    assert "nope.jsonl" in str(e.value)
    assert all(name in str(e.value) for name in dd.FILES)
    assert dd.check_names(["nope.jsonl"], allow_unknown=True) == ["nope.jsonl"]


def test_main_unknown_name_exits_2_on_stderr(capsys, tmp_path):
    assert dd.main(["nope.jsonl", "--out_dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "nope.jsonl" in err and "sft_mini_512.jsonl" in err and out == ""
    assert list(tmp_path.iterdir()) == []


def test_main_allow_unknown_reaches_the_hub(hf, tmp_path):
    assert dd.main(["new_file.jsonl", "--allow_unknown", "--out_dir", str(tmp_path)]) == 0
    assert hf.calls[0]["filename"] == "new_file.jsonl"
    assert (tmp_path / "new_file.jsonl").stat().st_size > 0


def test_huggingface_call_arguments(hf, tmp_path, capsys):
    assert dd.main(["lora_identity.jsonl", "dpo.jsonl", "--out_dir", str(tmp_path), "--endpoint", "http://mirror"]) == 0
    assert [c["filename"] for c in hf.calls] == ["lora_identity.jsonl", "dpo.jsonl"]
    for c in hf.calls:
        assert c["repo_id"] == "jingyaogong/minimind_dataset"
        assert c["repo_type"] == "dataset"
        assert c["local_dir"] == str(tmp_path)
        assert c["endpoint"] == "http://mirror"
        assert c["force_download"] is False
    out = capsys.readouterr().out
    assert "ok lora_identity.jsonl" in out and "15 B" in out  # size reported after the download


def test_modelscope_call_arguments(monkeypatch, tmp_path):
    fake = FakeHub()
    monkeypatch.setitem(sys.modules, "modelscope", type(sys)("modelscope"))
    monkeypatch.setitem(sys.modules, "modelscope.hub", type(sys)("modelscope.hub"))
    file_download = type(sys)("modelscope.hub.file_download")
    file_download.dataset_file_download = fake
    monkeypatch.setitem(sys.modules, "modelscope.hub.file_download", file_download)
    assert dd.main(["dpo.jsonl", "--source", "modelscope", "--out_dir", str(tmp_path)]) == 0
    assert fake.calls == [dict(dataset_id="gongjy/minimind_dataset", file_path="dpo.jsonl", local_dir=str(tmp_path))]
    assert (tmp_path / "dpo.jsonl").read_bytes() == fake.content


def test_missing_modelscope_says_pip_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_modelscope(name, *args, **kwargs):
        if name.startswith("modelscope"):
            raise ImportError("No module named 'modelscope'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelscope)
    with pytest.raises(SystemExit) as e:
        dd.main(["dpo.jsonl", "--source", "modelscope", "--out_dir", str(tmp_path)])
    assert "pip install modelscope" in str(e.value.code)


def test_existing_file_skipped_unless_force(tmp_path, capsys):
    (tmp_path / "dpo.jsonl").write_bytes(b"old\n")
    calls = []
    assert dd.download(["dpo.jsonl"], out_dir=str(tmp_path), fetchers=fake_fetcher(calls)) == []
    assert calls == [] and (tmp_path / "dpo.jsonl").read_bytes() == b"old\n"
    assert "skip dpo.jsonl" in capsys.readouterr().out
    assert dd.download(["dpo.jsonl"], out_dir=str(tmp_path), force=True, fetchers=fake_fetcher(calls)) == []
    assert calls == [("dpo.jsonl", str(tmp_path), True, None)]
    assert (tmp_path / "dpo.jsonl").read_bytes() == b"data\n"


def test_empty_existing_file_is_downloaded_again(tmp_path):
    (tmp_path / "dpo.jsonl").write_bytes(b"")
    calls = []
    assert dd.download(["dpo.jsonl"], out_dir=str(tmp_path), fetchers=fake_fetcher(calls)) == []
    assert len(calls) == 1 and (tmp_path / "dpo.jsonl").read_bytes() == b"data\n"


def test_failure_is_reported_and_others_continue(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def flaky(**kwargs):
        if kwargs["filename"] == "dpo.jsonl":
            raise ConnectionError("connection reset")
        return FakeHub()(**kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", flaky)
    assert dd.main(["dpo.jsonl", "lora_identity.jsonl", "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dpo.jsonl" in err and "huggingface" in err and "connection reset" in err
    assert "--source modelscope" in err  # suggests the other hub
    assert (tmp_path / "lora_identity.jsonl").stat().st_size > 0
    assert not (tmp_path / "dpo.jsonl").exists()


def test_empty_result_counts_as_failure(tmp_path, capsys):
    failed = dd.download(["dpo.jsonl"], source="modelscope", out_dir=str(tmp_path),
                         fetchers=fake_fetcher([], content=b""))
    assert failed == ["dpo.jsonl"]
    assert "--source huggingface" in capsys.readouterr().err


def test_list_prints_every_known_name(capsys):
    assert dd.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, (size, stage) in dd.FILES.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert size in line and stage in line
    assert "approximate" in out


def test_default_out_dir_is_repo_dataset_regardless_of_cwd(repo_root, tmp_path, monkeypatch):
    assert dd.DEFAULT_OUT_DIR == os.path.join(repo_root, "dataset")
    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dd, "download", lambda names, source, out_dir, force, endpoint: seen.append(out_dir) or [])
    assert dd.main(["dpo.jsonl"]) == 0
    assert seen == [os.path.join(repo_root, "dataset")]
    out = subprocess.run([sys.executable, SCRIPT, "--list"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert f"files go to {os.path.join(repo_root, 'dataset')}" in out
