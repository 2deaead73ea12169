"""Training faults: non-finite losses, two runs in one folder, resumes with another config, damaged
run folders (partial loss line, corrupt checkpoint, corrupt RNG state) and a full disk."""
# ruff: noqa: F811 - `dataset` is test_train's fixture, imported to share it

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import _cfg, _env, _write, dataset  # noqa: F401 - `dataset` is a fixture

import llavakit.cli
from llavakit.train import run_training
from llavakit.train.config import ConfigError, TrainingError
from llavakit.train.loop import FINISHED, NonFiniteError, read_losses
from llavakit.train.runlog import LOCK_FILE, RunLock, RunLockedError


def _finite(path):
    return all(torch.isfinite(v).all() for v in load_file(str(path)).values())


def _steps(run):
    return [r["step"] for r in read_losses(run / "losses.jsonl")]


# --- non-finite loss / gradients ----------------------------------------------------------------
def test_huge_lr_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(tiny_dirs, dataset,
                                                                                       tmp_path, capsys):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "nan", max_steps=6, lr=1e30, save_every=1, keep_last=1)
    path = _write(tmp_path, tree)
    assert llavakit.cli.main(["train", str(path)]) == 1  # stopped during training: non-zero exit
    err = capsys.readouterr().err
    m = re.search(r"non-finite (loss|gradient norm) at step (\d+)", err)
    assert m, err
    bad_step = int(m.group(2))
    assert bad_step >= 2 and "train.on_nonfinite=stop" in err and "train.lr" in err
    run = tmp_path / "nan"
    good = run / f"checkpoint-{bad_step - 1}"
    assert f"{good.name}, is intact" in err
    assert [p.name for p in run.glob("checkpoint-*")] == [good.name]  # keep_last=1 did not rotate it out
    assert _finite(good / "model.safetensors")
    assert not (run / "model").exists() and not list(run.glob("*.tmp"))  # no final model with NaNs
    assert not (run / LOCK_FILE).exists()  # released on the way out
    rows = read_losses(run / "losses.jsonl")
    assert rows[-1]["step"] == bad_step and rows[-1]["nonfinite"] is True


def _nan_at(monkeypatch, calls: set[int]):
    """Make the model's loss NaN on the given forward calls (1-based; one forward per step here)."""
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    orig = LlavakitForConditionalGeneration.forward
    n = {"calls": 0}

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        n["calls"] += 1
        if n["calls"] in calls and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlavakitForConditionalGeneration, "forward", forward)


def test_skip_mode_skips_up_to_the_limit_then_stops(tiny_dirs, dataset, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2, 3})
    tree = _cfg(tiny_dirs, dataset, tmp_path / "skip", max_steps=4, on_nonfinite="skip", max_nonfinite_skips=2)
    run = run_training(_write(tmp_path, tree))
    out = capsys.readouterr().out
    assert "non-finite loss at step 2" in out and "skipped this optimizer step (1 of at most" in out
    assert "2 non-finite step(s) skipped" in out
    rows = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("nonfinite", False) for r in rows] == [False, True, True, False]
    assert _finite(run / "model" / "model.safetensors")

    _nan_at(monkeypatch, {2, 3})  # a fresh counter (the first patch is past its calls)
    tree["train"].update(output_dir=str(tmp_path / "skip1"), max_nonfinite_skips=1)
    with pytest.raises(NonFiniteError, match=r"at step 3 .*all train.max_nonfinite_skips=1 skips are used up"):
        run_training(_write(tmp_path, tree))
    assert not (tmp_path / "skip1" / "model").exists()


class _InfGrad(torch.autograd.Function):
    """Adds 0 to the loss; its gradient is inf."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("inf"))


def test_non_finite_gradients_with_a_finite_loss_are_caught_without_clipping(tiny_dirs, dataset, tmp_path,
                                                                            monkeypatch):
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    orig = LlavakitForConditionalGeneration.forward

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        out.loss = out.loss + _InfGrad.apply(self.multi_modal_projector.linear_1.bias)
        return out

    monkeypatch.setattr(LlavakitForConditionalGeneration, "forward", forward)
    tree = _cfg(tiny_dirs, dataset, tmp_path / "grad", max_steps=2, max_grad_norm=0)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 1 \(loss [0-9.]+, gradient norm inf"):
        run_training(_write(tmp_path, tree))


def test_non_finite_weights_are_never_saved_as_the_final_model(tiny_dirs, dataset, tmp_path, monkeypatch):
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):  # the update of step 2 leaves a NaN weight (the loss of step 2 was finite)
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "w"
    tree = _cfg(tiny_dirs, dataset, run, max_steps=2, save_every=1)
    with pytest.raises(NonFiniteError, match=r"weights are non-finite after step 2; not saving them, and the last "
                                             r"complete checkpoint, checkpoint-1, is intact"):
        run_training(_write(tmp_path, tree))
    assert not (run / "model").exists() and not (run / "final.tmp").exists()
    assert _finite(run / "checkpoint-1" / "model.safetensors")


# --- one run per folder -------------------------------------------------------------------------
_HOLD = ("import sys, time; from llavakit.train.runlog import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)")


def test_a_live_run_locks_its_folder_and_a_dead_one_leaves_a_stale_lock(tiny_dirs, dataset, tmp_path, monkeypatch,
                                                                       capsys):
    run = tmp_path / "locked"
    path = _write(tmp_path, _cfg(tiny_dirs, dataset, run, max_steps=1))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from llavakit.train import loop

        def no_model(cfg):  # the lock is checked before anything slow
            raise AssertionError("the model was loaded although the folder is locked")

        with monkeypatch.context() as m:
            m.setattr(loop, "assemble", no_model)
            for resume in (False, True):
                with pytest.raises(RunLockedError, match=rf"in use by another training run \(PID {holder.pid}"):
                    run_training(path, resume=resume)
            assert llavakit.cli.main(["train", str(path), "--resume"]) == 2
            assert f"PID {holder.pid}" in capsys.readouterr().err
        assert not (run / "config.yaml").exists()  # a refused run writes nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind by the killed process
    run_training(path)
    assert f"cleared a stale lock in {run} left by PID {holder.pid}" in capsys.readouterr().out
    assert (run / "model").is_dir() and not (run / LOCK_FILE).exists()


def test_lock_in_process_refuses_a_second_holder(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    assert a.acquire() is None
    with pytest.raises(RunLockedError) as e:
        b.acquire()
    assert e.value.pid == os.getpid()
    a.release()
    assert b.acquire() is None
    b.release()
    assert not (tmp_path / LOCK_FILE).exists()


# --- resume checks the config -------------------------------------------------------------------
@pytest.fixture()
def finished_run(tiny_dirs, dataset, tmp_path):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "run", max_steps=3, save_every=1, keep_last=2)
    path = _write(tmp_path, tree)
    run = run_training(path)
    return run, path, (run / "config.yaml").read_bytes()


def test_resume_with_another_batch_size_seed_or_data_is_refused_with_the_differences(finished_run, dataset,
                                                                                     tmp_path, capsys):
    run, path, original = finished_run
    other = tmp_path / "other.json"
    shutil.copy(dataset / "train.json", other)
    code = llavakit.cli.main(["train", str(path), "--resume", "--train.batch_size=2", "--train.seed=7",
                              f"--data.train={other}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "differs from the one checkpoint-2 was trained with" in err
    assert "train.batch_size: 4 -> 2" in err and "train.seed: 0 -> 7" in err
    assert f"data.train: '{dataset / 'train.json'}' -> '{other}'" in err
    assert "--resume-allow data.train,train.batch_size,train.seed" in err
    assert (run / "config.yaml").read_bytes() == original and not list(run.glob("config.resume-*"))
    # allowing batch_size still cannot change the samples per micro-step the data position counts in
    with pytest.raises(ConfigError, match=r"batch_size x processes was 4 .* now 2"):
        run_training(path, overrides=["--train.batch_size=2", "--train.resume_allow=batch_size"], resume=True)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['max_step'\]"):
        run_training(path, overrides=["--train.max_steps=5", "--train.resume_allow=max_step"], resume=True)
    with pytest.raises(ConfigError, match=r"train.max_steps: 3 -> 5"):
        run_training(path, overrides=["--train.max_steps=5"], resume=True)


def test_an_allowed_change_resumes_and_keeps_the_original_config(finished_run, capsys):
    run, path, original = finished_run
    assert llavakit.cli.main(["train", str(path), "--resume", "--resume-allow", "max_steps",
                              "--train.max_steps=4", "--train.log_every=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-2" in out
    assert "train.max_steps: 3 -> 4" in out and "train.log_every: 1 -> 2" in out  # reported, not refused
    assert (run / "config.yaml").read_bytes() == original
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["train"]["max_steps"] == 4
    assert _steps(run) == [1, 2, 3, 4]
    # the run is finished now: resuming it again would only retrain its last steps, so it is refused
    with pytest.raises(ConfigError, match=r"already finished at step 4 .*raise train.max_steps"):
        run_training(path, overrides=["--train.max_steps=4"], resume=True)
    assert not (run / "config.resume-2.yaml").exists() and _steps(run) == [1, 2, 3, 4]
    # the next resume compares with the newest checkpoint's config (max_steps 4 now): only the new change
    run_training(path, overrides=["--train.max_steps=5", "--train.resume_allow=max_steps"], resume=True)
    assert (run / "config.resume-2.yaml").is_file() and (run / "config.yaml").read_bytes() == original


def test_resume_on_changed_data_at_the_same_path_is_refused_unless_allowed(tiny_dirs, dataset, tmp_path, capsys):
    data = tmp_path / "data.json"
    rows = json.loads((dataset / "train.json").read_text())
    data.write_text(json.dumps(rows))
    tree = _cfg(tiny_dirs, dataset, tmp_path / "d", max_steps=2, save_every=1)
    tree["data"]["train"] = str(data)
    path = _write(tmp_path, tree)
    run = run_training(path)
    (run / FINISHED).unlink()  # as if it had crashed before the end
    data.write_text(json.dumps(rows[:-1]))  # one sample fewer, same file name
    with pytest.raises(ConfigError, match=r"(?s)training data differs from what checkpoint-1 was trained on:\n  "
                                          r"data.content: '16 samples, .*' -> '15 samples, .*--resume-allow data.content"):
        run_training(path, resume=True)
    capsys.readouterr()
    run_training(path, overrides=["--train.resume_allow=data.content"], resume=True)
    assert "resuming with other training data" in capsys.readouterr().out
    assert _steps(run) == [1, 2]


# --- damaged run folders ------------------------------------------------------------------------
@pytest.fixture()
def saved_run(tiny_dirs, dataset, tmp_path):
    """A 4-step run with checkpoints 2 and 3, its config path and its losses, as a crash just before the
    end leaves it (no finished.json: a finished run is not resumed)."""
    tree = _cfg(tiny_dirs, dataset, tmp_path / "dmg", max_steps=4, save_every=1, keep_last=2, batch_size=2)
    tree["model"]["attn_implementation"] = "eager"
    path = _write(tmp_path, tree)
    run = run_training(path)
    (run / FINISHED).unlink()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    return run, path, read_losses(run / "losses.jsonl")


def _same_losses(run, ref):
    got = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)


def test_a_partial_last_loss_line_is_dropped_on_resume(saved_run, capsys):
    run, path, ref = saved_run
    with open(run / "losses.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the disk filled up mid-line
    assert _steps(run) == [1, 2, 3, 4]  # readers skip it too
    capsys.readouterr()
    run_training(path, resume=True)
    assert "unreadable line(s)" in capsys.readouterr().out
    _same_losses(run, ref)


def test_a_broken_line_inside_the_loss_log_is_an_error_for_readers(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n{"st\n{"step": 2, "loss": 1.0, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_losses(log)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(saved_run, capsys):
    run, path, ref = saved_run
    weights = run / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    run_training(path, resume=True)
    out = capsys.readouterr().out
    assert "checkpoint-3 cannot be loaded" in out and "checkpoint-3.corrupt" in out
    assert "resumed from" in out and "checkpoint-2 (step 2" in out
    assert (run / "checkpoint-3.corrupt").is_dir()  # kept for a look, ignored from now on
    _same_losses(run, ref)


def test_a_corrupt_rng_state_is_an_error_unless_allowed(saved_run, capsys):
    run, path, _ = saved_run
    (run / "checkpoint-3" / "random_states_0.pkl").write_bytes(b"not a pickle")
    with pytest.raises(TrainingError, match=r"cannot resume exactly: the RNG state .*random_states_0.pkl is "
                                            r"unreadable.*--resume-allow rng_state"):
        run_training(path, resume=True)
    assert (run / "checkpoint-3").is_dir()  # not treated as corruption: nothing renamed
    capsys.readouterr()
    run_training(path, overrides=["--train.resume_allow=rng_state"], resume=True)
    out = capsys.readouterr().out
    assert "resuming anyway (resume_allow: rng_state)" in out and "checkpoint-3 (step 3" in out
    assert _steps(run) == [1, 2, 3, 4]


def _full_disk(real, when, with_name=True):
    def save(obj, filename, *a, **k):
        if when(str(filename)):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # part of the file made it
            raise OSError(errno.ENOSPC, "No space left on device", *([str(filename)] if with_name else []))
        return real(obj, filename, *a, **k)

    return save


@pytest.mark.parametrize("with_name", [True, False])
def test_disk_full_during_a_checkpoint_names_the_file_and_leaves_no_tmp(tiny_dirs, dataset, tmp_path, monkeypatch,
                                                                        capsys, with_name):
    import accelerate.utils.other as acc

    monkeypatch.setattr(acc, "safe_save_file", _full_disk(acc.safe_save_file, lambda f: "checkpoint-2.tmp" in f,
                                                          with_name))
    run = tmp_path / "full"
    path = _write(tmp_path, _cfg(tiny_dirs, dataset, run, max_steps=4, save_every=1))
    assert llavakit.cli.main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint checkpoint-2" in err
    assert str(run / "checkpoint-2.tmp" / "model.safetensors") in err and "ENOSPC" in err
    assert "checkpoint-1 is intact" in err
    assert not list(run.glob("*.tmp")) and [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-1"]
    assert _finite(run / "checkpoint-1" / "model.safetensors")


def test_disk_full_during_the_final_save_leaves_no_half_written_model(tiny_dirs, dataset, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk(safetensors.torch.save_file, lambda f: True))
    tree = _cfg(tiny_dirs, dataset, tmp_path / "fin", stage="pretrain", max_steps=1)
    tree["data"].update(train=str(dataset / "captions.json"), template="plain")
    with pytest.raises(TrainingError, match=r"could not write the final model: .*final.tmp/projector.safetensors: "
                                            r"ENOSPC") as e:
        run_training(_write(tmp_path, tree))
    assert e.value.errno == errno.ENOSPC
    run = tmp_path / "fin"
    assert not (run / "projector.safetensors").exists() and not (run / "final.tmp").exists()


# --- several processes: refusals reach every rank (no rank left waiting) ------------------------------
def _launch2(cfg_path, *extra):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(29600 + os.getpid() % 1000), "-m", "llavakit.cli", "train", str(cfg_path), *extra]


@pytest.mark.slow
def test_two_processes_refuse_a_locked_folder_and_a_changed_resume_then_resume_on_one(tiny_dirs, dataset, tmp_path):
    run = tmp_path / "ddp"
    tree = _cfg(tiny_dirs, dataset, run, max_steps=3, save_every=1, batch_size=2)
    tree["data"]["group_by_length"] = False
    path = _write(tmp_path, tree)
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    first = subprocess.run(_launch2(path), env=env, capture_output=True, text=True, check=False, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ref = read_losses(run / "losses.jsonl")

    changed = subprocess.run(_launch2(path, "--resume", "--train.seed=3"), env=env, capture_output=True, text=True,
                             check=False, timeout=300)
    assert changed.returncode != 0 and "train.seed: 0 -> 3" in changed.stderr, changed.stderr[-3000:]

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked = subprocess.run(_launch2(path, "--resume"), env=env, capture_output=True, text=True, check=False,
                                timeout=300)
        assert locked.returncode != 0 and f"PID {holder.pid}" in locked.stderr, locked.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait()

    # 1 process x 4 samples is the same global micro-batch as 2 x 2: allowed, and the losses continue exactly
    (run / FINISHED).unlink()  # as if the 2-process run had died before its end (a finished run is not resumed)
    one = subprocess.run([sys.executable, "-m", "llavakit.cli", "train", str(path), "--resume", "--train.batch_size=4",
                          "--resume-allow", "batch_size,num_processes"], env=_env(), capture_output=True, text=True,
                         check=False, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "num_processes: 2 -> 1" in one.stdout and "resumed from" in one.stdout
    got = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-4, abs=1e-5)


def test_disk_full_on_the_loss_log_is_a_clear_error(tiny_dirs, dataset, tmp_path, monkeypatch):
    import builtins

    from llavakit.train import runlog

    n = {"appends": 0}

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith("losses.jsonl") and mode == "a":
            n["appends"] += 1
            if n["appends"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *a, **k)

    monkeypatch.setattr(runlog, "open", fake_open, raising=False)
    run = tmp_path / "log"
    with pytest.raises(TrainingError, match=r"could not write the loss log: .*losses.jsonl: ENOSPC .*cut-off last "
                                            r"line is dropped on --resume"):
        run_training(_write(tmp_path, _cfg(tiny_dirs, dataset, run, max_steps=3)))
    assert _steps(run) == [1]
