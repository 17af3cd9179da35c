"""Robustness of training runs: atomic writes, kills and resumes, locking, config checks.

Kills are deterministic (at a hook point or a patched call), never timer-based."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from distilpose import fileio
from distilpose.checkpoint import atomic_save
from distilpose.training.trainer import StopTraining, Trainer

sys.path.insert(0, os.path.dirname(__file__))
from test_training import tiny_cfg  # noqa: E402

NO_TEACHER = {"teacher.preset": None}


def _cfg(work, **over):
    return tiny_cfg("distill", work, **NO_TEACHER, **over)


# ----------------------------------------------------------------------------- fileio / atomic_save


def test_atomic_writes_keep_permissions_and_sync_the_folder(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        p = tmp_path / "a.pth"
        atomic_save({"x": torch.zeros(1)}, str(p))
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644  # as open() would give, not mkstemp's 0o600
        os.chmod(p, 0o640)
        atomic_save({"x": torch.ones(1)}, str(p))
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640  # an existing file keeps its mode
        t = tmp_path / "a.txt"
        t.write_text("old")
        os.chmod(t, 0o600)
        fileio.atomic_write(str(t), "new")
        assert t.read_text() == "new" and stat.S_IMODE(os.stat(t).st_mode) == 0o600
    finally:
        os.umask(old)

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd))[1])
    fileio.atomic_write(str(tmp_path / "b.txt"), "x")
    atomic_save({"x": torch.zeros(1)}, str(tmp_path / "b.pth"))
    assert synced.count(False) == 2 and synced.count(True) == 2  # the file, then its folder (the rename)


def test_failed_atomic_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "last.pth"
    atomic_save({"x": torch.zeros(1)}, str(p))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"x": torch.ones(1)}, str(p))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert torch.equal(torch.load(p, weights_only=True)["x"], torch.zeros(1))


# ----------------------------------------------------------------------------- resume checks


def test_refused_resume_leaves_config_yaml_and_same_steps_other_batch_size_is_refused(tmp_path):
    run = tmp_path / "r"
    Trainer(_cfg(run, **{"data.batch_size": 6, "max_steps": 1})).fit()
    cfg_before = (run / "config.yaml").read_text()
    last_before = (run / "last.pth").read_bytes()
    # 16 samples: batch 6 and batch 7 both give 2 iterations/epoch, but another start sample
    with pytest.raises(ValueError, match="batch size 6"):
        Trainer(_cfg(run, **{"data.batch_size": 7})).fit(resume=str(run / "last.pth"))
    with pytest.raises(ValueError, match="same world size and batch size"):
        Trainer(_cfg(run, **{"data.batch_size": 8})).fit(resume=str(run / "last.pth"))
    assert (run / "config.yaml").read_text() == cfg_before  # not replaced by the refused config
    assert (run / "last.pth").read_bytes() == last_before


def test_resuming_a_finished_run_is_a_no_op(tmp_path, capsys):
    run = tmp_path / "f"
    Trainer(_cfg(run, **{"optim.epochs": 1})).fit()
    metrics = (run / "metrics.jsonl").read_text()
    last = (run / "last.pth").read_bytes()
    out = Trainer(_cfg(run, **{"optim.epochs": 1})).fit(resume=str(run / "last.pth"))
    assert out["finished"] and out["global_step"] == 4
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == metrics  # no second "end" / "resume" record
    assert (run / "last.pth").read_bytes() == last
    # a run stopped by max_steps, resumed with the same max_steps: no extra step
    run2 = tmp_path / "m"
    Trainer(_cfg(run2, max_steps=3)).fit()
    assert Trainer(_cfg(run2, max_steps=3)).fit(resume=str(run2 / "last.pth"))["global_step"] == 3


def test_best_pth_written_before_a_kill_is_not_replaced_by_a_worse_one(tmp_path, monkeypatch):
    """Killed between best.pth (epoch 1, AP 0.9) and last.pth; the replayed evaluation scores
    lower (e.g. a nondeterministic kernel): best.pth must stay the AP 0.9 one."""
    run = tmp_path / "b"
    over = {"optim.epochs": 2, "eval_interval": 1, "ckpt_interval_steps": 2}
    aps = iter([0.9, 0.5, 0.4])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"AP": next(aps)})
    real_save_last = Trainer.save_last

    def dying_save_last(self):
        if self.epoch == 1 and self.step_in_epoch == 0:
            raise StopTraining  # killed at the epoch end, after best.pth, before last.pth
        real_save_last(self)

    monkeypatch.setattr(Trainer, "save_last", dying_save_last)
    with pytest.raises(StopTraining):
        Trainer(_cfg(run, **over), val_dataset=[0]).fit()
    assert torch.load(run / "best.pth", weights_only=True)["metrics"]["AP"] == 0.9
    assert torch.load(run / "last.pth", weights_only=True)["trainer"]["best_metric"] is None
    monkeypatch.setattr(Trainer, "save_last", real_save_last)
    out = Trainer(_cfg(run, **over), val_dataset=[0]).fit(resume=str(run / "last.pth"))
    assert out["best_AP"] == 0.9
    assert torch.load(run / "best.pth", weights_only=True)["metrics"]["AP"] == 0.9


# ----------------------------------------------------------------------------- work dir


def test_second_run_on_a_locked_work_dir_is_refused(tmp_path):
    import fcntl

    run = tmp_path / "l"
    seen = []

    def second_run(tr):  # while the first run holds the folder
        if tr.global_step == 1:
            with pytest.raises(RuntimeError, match="in use by another training run"):
                Trainer(_cfg(run)).fit()
            seen.append(True)

    Trainer(_cfg(run, max_steps=2), hooks=[second_run]).fit()
    assert seen
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl") if '"train"' in l]
    assert steps == [1, 2]
    fd = os.open(run / ".lock", os.O_RDWR)  # released at the end of fit()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_work_dir_fails_clearly_and_keeps_files(tmp_path):
    run = tmp_path / "ro"
    Trainer(_cfg(run, max_steps=1)).fit()
    before = {p: (run / p).read_bytes() for p in os.listdir(run)}
    os.chmod(run, 0o555)
    try:
        with pytest.raises(PermissionError):
            Trainer(_cfg(run)).fit(resume=str(run / "last.pth"))
    finally:
        os.chmod(run, 0o755)
    assert {p: (run / p).read_bytes() for p in os.listdir(run)} == before


def test_sigkill_during_checkpoint_write_keeps_a_loadable_last_pth(tmp_path):
    """A subprocess is SIGKILLed (os._exit-free: the kernel kills it) in the middle of writing
    last.pth; the old last.pth loads, and --resume finishes the run."""
    run = tmp_path / "k"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_training import tiny_cfg
        from distilpose.training.trainer import Trainer
        real = torch.save
        def save(obj, f, *a, **k):
            if obj.get("trainer", {{}}).get("global_step") == 3:
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = save
        Trainer(tiny_cfg("distill", {str(run)!r}, **{{"teacher.preset": None, "ckpt_interval_steps": 1}})).fit()
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    ck = torch.load(run / "last.pth", weights_only=True)
    assert ck["trainer"]["global_step"] == 2
    out = Trainer(_cfg(run, ckpt_interval_steps=1)).fit(resume=str(run / "last.pth"))
    assert out["finished"] and out["global_step"] == 8
    lines = (run / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(l) for l in lines]  # every line whole
    steps = [r["step"] for r in recs if r["type"] == "train"]
    assert steps == list(range(1, 9))


def test_fresh_run_in_a_used_work_dir_sets_the_earlier_run_aside(tmp_path):
    """Without --resume, a run in a folder that holds an earlier run's checkpoints, metrics and
    config moves them to work_dir/previous-<time>/ first: nothing is overwritten."""
    from distilpose.training import Trainer, apply_overrides, get_preset

    def cfg():
        return apply_overrides(get_preset("tiny_student"), {
            "data.kind": "synthetic", "data.demo_num_train": 8, "data.batch_size": 4, "data.num_workers": 0,
            "optim.epochs": 1, "optim.warmup_iters": 0, "optim.milestones": [], "work_dir": str(tmp_path),
            "progress": False, "final_eval": False, "device": "cpu", "teacher.preset": None})

    Trainer(cfg()).fit()
    before = {n: (tmp_path / n).read_bytes() for n in ("last.pth", "metrics.jsonl", "config.yaml")}
    Trainer(cfg()).fit()
    prev = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(prev) == 1
    for n, data in before.items():
        assert (prev[0] / n).read_bytes() == data, n
    assert (tmp_path / "last.pth").exists() and (tmp_path / "config.yaml").exists()


def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path):
    """A run killed while saving leaves a ``.tmp-*.pth``; the next run on the (locked) work dir
    removes it and leaves the user's files alone."""
    from distilpose.training import Trainer, apply_overrides, get_preset

    stale = tmp_path / ".tmp-abc123.pth"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.tmp-keep.txt"
    mine.write_text("mine")
    cfg = apply_overrides(get_preset("tiny_student"), {
        "data.kind": "synthetic", "data.demo_num_train": 8, "data.batch_size": 4, "data.num_workers": 0,
        "optim.epochs": 1, "optim.warmup_iters": 0, "optim.milestones": [], "work_dir": str(tmp_path),
        "progress": False, "final_eval": False, "device": "cpu", "teacher.preset": None})
    Trainer(cfg).fit()
    assert not stale.exists() and mine.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
