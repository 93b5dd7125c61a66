"""--from_resume 1 on two machines that do not share --checkpoint_dir (issue 31, item 5).

Only process 0 writes the resume file, so without a shared folder the other machine has no copy, or a stale one.
Each test starts two local "machines": this file run as a script, once per rank, as two processes of one gloo
process group (the environment torchrun would give them), each with its own folder tmp/machine{rank}."""
import os
import subprocess
import sys

import torch

from conftest import REPO_ROOT, free_port, tiny_model
from test_train import Rows, fake_run

from trainer import distributed
from trainer.resume import Checkpoint
from trainer.sampler import SampleStream

ROWS = 24  # batch 2, one micro-batch a step: 12 steps an epoch on one process, 6 on two


def machine_run(folder, **overrides):
    """A Run whose weights and resume file live in `folder` (its machine's own disk); a DDP one when RANK is set."""
    return fake_run(save_dir=str(folder / "out"), checkpoint_dir=str(folder / "ckpt"), batch_size=2,
                    accumulation_steps=1, epochs=1, from_resume=1, **overrides)


def trained_checkpoint(run, steps):
    """A tiny model and its AdamW, trained (each process on its own rows, no DDP) for `steps` steps of the stream."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = SampleStream(Rows(ROWS), run.args, run.rank, run.world_size, run.device)
    for step, window in stream:
        for batch in window:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == steps:
            break
    return Checkpoint(run, stream, model, optimizer)


def machine(rank, tmp, save_first, rows):
    """One machine's process (run by start_machines): optionally train 3 steps and save (process 0 alone writes, into
    its machine0 folder), then restore into a fresh model, with `rows` training rows, and write what it resumed with
    to tmp/restored{rank}.pth."""
    run = machine_run(tmp / f"machine{rank}")
    rng_at_save = None
    if save_first:
        checkpoint = trained_checkpoint(run, steps=3)
        rng_at_save = torch.get_rng_state()  # what save() records for this process
        checkpoint.save()
    model = tiny_model(seed=10 + rank)  # other weights (and a reseeded generator) than the ones saved
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = SampleStream(Rows(rows), run.args, run.rank, run.world_size, run.device)
    Checkpoint(run, stream, model, optimizer).restore()
    rng = torch.get_rng_state()
    torch.manual_seed(run.args.seed + rank)  # as Run seeds each process (tiny_model reseeded them alike)
    fresh = run.load_model()  # a random init, no --from_weight
    torch.save(dict(step=stream.step, epoch=stream.epoch, consumed=stream.consumed, model=model.state_dict(),
                    optimizer=optimizer.state_dict(), rng_at_save=rng_at_save, rng=rng, fresh=fresh.state_dict()),
               tmp / f"restored{rank}.pth")
    distributed.leave_together(0)


def start_machines(tmp, save_first=False, rows=(ROWS, ROWS), timeout=120):
    """Both machines' processes, to the end: [(exit code, output)] of rank 0 and rank 1; rows: each machine's number
    of training rows. A hang fails the test."""
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", MINIMIND_NO_PROGRESS="1")
        processes.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(tmp),
                                           str(int(save_first)), str(rows[rank])], cwd=REPO_ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    try:
        for process in processes:
            output = process.communicate(timeout=timeout)[0]
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate()[0] for process in processes]
        raise AssertionError(f"the two machines did not finish within {timeout} s (a hang?):\n" +
                             "\n".join(f"--- rank {rank}:\n{out[-2000:]}" for rank, out in enumerate(outputs)))
    return results


def save_alone(folder, steps):
    """A resume file written by a one-process run after `steps` steps into folder/ckpt; its path."""
    run = machine_run(folder)
    checkpoint = trained_checkpoint(run, steps)
    checkpoint.save()
    return run.resume_path


def test_a_machine_without_the_resume_file_gets_process_0s(tmp_path):
    """A two-machine run saves at step 3 (the file lands on machine 0 only) and resumes: machine 1 resumes from
    process 0's file, at the same step, with the same weights and optimizer state and its own random state."""
    results = start_machines(tmp_path, save_first=True)
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    saved_path = tmp_path / "machine0" / "ckpt" / "x_64_resume.pth"
    assert saved_path.exists() and not list((tmp_path / "machine1" / "ckpt").iterdir())
    saved = torch.load(saved_path, weights_only=True)
    assert saved["step"] == 3 and saved["world_size"] == 2
    for rank in (0, 1):
        restored = torch.load(tmp_path / f"restored{rank}.pth", weights_only=True)
        assert (restored["step"], restored["epoch"], restored["consumed"]) == \
            (saved["step"], saved["epoch"], saved["consumed"]), f"rank {rank} resumed at step {restored['step']}"
        for name, value in saved["model"].items():
            assert torch.equal(restored["model"][name], value), f"rank {rank}: {name} is not process 0's"
        for key, value in saved["optimizer"]["state"][0].items():
            assert torch.equal(restored["optimizer"]["state"][0][key], value), f"rank {rank}: AdamW's {key}"
        assert torch.equal(restored["rng"], restored["rng_at_save"])  # each process its own saved random state
    # Run.load_model gives every process process 0's weights, so copies made before DDP's own broadcast (DPO's and
    # RL's reference, PPO's old actor) are the policy on every process
    fresh = [torch.load(tmp_path / f"restored{rank}.pth", weights_only=True)["fresh"] for rank in (0, 1)]
    assert all(torch.equal(fresh[0][name], fresh[1][name]) for name in fresh[0])
    output0 = results[0][1]
    assert "there is no resume file for process 1 (" in output0 and "so process 0 sends its" in output0
    assert "--checkpoint_dir is not shared" in output0
    assert "resumed from" in output0 and "step 3" in output0


def test_a_resume_file_that_process_0_does_not_see_stops_every_process(tmp_path):
    """The file only on machine 1 (process 0 never wrote it: stale) -> both processes stop, naming the files."""
    stale = save_alone(tmp_path / "machine1", steps=2)
    results = start_machines(tmp_path)
    for rank, (code, output) in enumerate(results):
        assert code != 0, f"rank {rank} went on:\n{output[-3000:]}"
        assert "the resume file is missing for process 0" in output, output[-3000:]
        assert "there is one for process 1 (" in output and stale in output
        assert "Put the file to resume from into process 0's --checkpoint_dir" in output
        assert "Traceback" not in output
    assert not (tmp_path / "restored0.pth").exists() and not (tmp_path / "restored1.pth").exists()


def test_resume_files_at_different_steps_stop_every_process(tmp_path):
    """Both machines hold a file, but machine 1's is from step 1 and machine 0's from step 3: both stop, saying
    where each process would have resumed."""
    save_alone(tmp_path / "machine0", steps=3)
    save_alone(tmp_path / "machine1", steps=1)
    results = start_machines(tmp_path)
    for rank, (code, output) in enumerate(results):
        assert code != 0, f"rank {rank} went on:\n{output[-3000:]}"
        assert "the processes' resume files differ" in output, output[-3000:]
        assert "ckpt/x_64_resume.pth) at step 3 (epoch 0, 6 samples into it)" in output
        assert "ckpt/x_64_resume.pth) at step 1 (epoch 0, 2 samples into it)" in output
        assert "Traceback" not in output



def test_data_that_only_one_machine_refuses_stops_every_process(tmp_path):
    """The same resume file on both machines, but machine 1 holds other data (26 rows, not 24): process 1 refuses
    the file, and process 0 stops with it instead of going on alone and waiting for process 1 forever."""
    path = save_alone(tmp_path / "machine0", steps=3)
    (tmp_path / "machine1" / "ckpt").mkdir(parents=True)
    (tmp_path / "machine1" / "ckpt" / "x_64_resume.pth").write_bytes(open(path, "rb").read())
    results = start_machines(tmp_path, rows=(ROWS, ROWS + 2))
    for rank, (code, output) in enumerate(results):
        assert code != 0, f"rank {rank} went on:\n{output[-3000:]}"
        assert "process 1: " in output and "was written for 24 training rows, but this data gives 26" in output, \
            output[-3000:]
        assert "Traceback" not in output


if __name__ == "__main__":  # one machine's process, started by start_machines
    from pathlib import Path
    machine(int(sys.argv[1]), Path(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]))
