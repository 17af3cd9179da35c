"""Training: config round trip, schedule, loss decrease, frozen teacher, exact resume, DDP (gloo), AMP."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from distilpose.models import build_model
from distilpose.training import Trainer, apply_overrides, get_preset, resolve_config
from distilpose.training.config import TrainConfig, parse_override, save_config
from distilpose.training.optim import build_optimizer, build_scheduler
from distilpose.training.synthetic import SyntheticPoseDataset
from distilpose.checkpoint import model_from_checkpoint
from distilpose.training.trainer import StopTraining

SMALL = (64, 48)


def tiny_cfg(mode: str, work_dir, **over) -> TrainConfig:
    base = get_preset("tiny_teacher" if mode == "teacher" else "tiny_student")
    sets = {
        "data.kind": "synthetic", "data.demo_num_train": 16, "data.batch_size": 4, "data.num_workers": 0,
        "optim.epochs": 2, "optim.warmup_iters": 0, "optim.milestones": [], "work_dir": str(work_dir),
        "progress": False, "log_interval": 1, "final_eval": False,
        "device": "cpu",  # these tests feed CPU batches directly; the GPU paths run in bench/
    }
    sets.update(over)
    return apply_overrides(base, sets)


def tiny_teacher_model(seed: int = 1):
    torch.manual_seed(seed)
    return build_model("tokenpose_tiny", input_size=SMALL)


def fixed_batch(n: int = 4, with_heatmaps: bool = True):
    ds = SyntheticPoseDataset(n, input_size=SMALL, train=False, with_heatmaps=with_heatmaps)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_overrides(tmp_path):
    cfg = get_preset("distilpose_s_coco")
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    path = tmp_path / "cfg.yaml"
    save_config(cfg, str(path))
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text())) == cfg
    jpath = tmp_path / "cfg.json"
    save_config(cfg, str(jpath))
    assert TrainConfig.from_dict(json.loads(jpath.read_text())) == cfg

    c2 = resolve_config("demo_student", None, ["optim.lr=5e-4", "optim.milestones=[3, 7]", "model.input_size=[256, 192]",
                                                 "teacher.checkpoint=null", "loss.disable=[token, score]", "amp=bf16",
                                                 "model.overrides={tde: {depth: 1}}"])
    assert c2.optim.lr == 5e-4 and c2.optim.milestones == [3, 7] and c2.model.input_size == (256, 192)
    assert c2.teacher.checkpoint is None and c2.loss.disable == ["token", "score"] and c2.amp == "bf16"
    assert c2.model.overrides == {"tde": {"depth": 1}}
    assert c2.name == "demo_student"

    # a YAML file with a base preset, then a --set on top; and a Python config file
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny_teacher\noptim:\n  epochs: 7\ndata:\n  batch_size: 3\n")
    c3 = resolve_config(str(f), None, ["data.batch_size=5"])
    assert c3.mode == "teacher" and c3.optim.epochs == 7 and c3.data.batch_size == 5
    py = tmp_path / "mine.py"
    py.write_text("base = 'tiny_student'\nconfig = {'optim': {'lr': 0.02}, 'seed': 3}\n")
    c4 = resolve_config(str(py))
    assert c4.mode == "distill" and c4.optim.lr == 0.02 and c4.seed == 3

    with pytest.raises(KeyError, match="optim.lrr"):
        resolve_config("demo_student", None, ["optim.lrr=1"])
    with pytest.raises(TypeError, match="optim.epochs"):
        resolve_config("demo_student", None, ["optim.epochs=abc"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("optim.lr")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        get_preset("nope")


def test_scheduler_matches_released_recipe():
    cfg = get_preset("distilpose_s_coco").optim
    p = torch.nn.Parameter(torch.randn(3))
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, iters_per_epoch=10)
    lrs = []
    for _ in range(2700):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert isinstance(opt, torch.optim.Adam)
    assert lrs[0] == pytest.approx(1e-3 * 0.001)
    assert lrs[250] == pytest.approx(1e-3 * (1 - 0.5 * 0.999))
    assert lrs[500] == pytest.approx(1e-3) and lrs[1999] == pytest.approx(1e-3)
    assert lrs[2000] == pytest.approx(1e-4) and lrs[2599] == pytest.approx(1e-4)
    assert lrs[2600] == pytest.approx(1e-5)
    assert cfg.epochs == 300


# ----------------------------------------------------------------------------- loss decreases, frozen teacher


def _overfit(trainer: Trainer, batch, steps: int):
    trainer.model.train()
    with torch.no_grad():
        before = float(trainer.objective(batch)["loss"])
    for _ in range(steps):
        trainer.train_step(batch)
    with torch.no_grad():
        after = float(trainer.objective(batch)["loss"])
    return before, after


def test_teacher_training_decreases_loss(tmp_path):
    tr = Trainer(tiny_cfg("teacher", tmp_path, **{"optim.lr": 3e-3}))
    before, after = _overfit(tr, fixed_batch(), 12)
    assert after < 0.8 * before, (before, after)


def test_distillation_decreases_loss_and_teacher_stays_frozen(tmp_path):
    teacher = tiny_teacher_model()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    tr = Trainer(tiny_cfg("distill", tmp_path, **{"optim.lr": 3e-3}), teacher=teacher)
    # the teacher is outside the trained module: not in the optimizer, not in the saved weights
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") or k.startswith("_teacher") for k in tr.objective.state_dict())
    batch = fixed_batch(with_heatmaps=False)
    before, after = _overfit(tr, batch, 12)
    assert after < 0.9 * before, (before, after)
    terms = tr.objective(batch)
    assert {"loss_kpt", "loss_vis_token", "loss_kpt_token", "loss_reg2hm", "loss_score"} <= set(terms)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    for p in teacher.parameters():
        assert p.grad is None and not p.requires_grad
    for k, v in teacher.state_dict().items():  # BN running stats too: the teacher ran in eval mode
        assert torch.equal(v, t_state[k]), k


def test_distill_needs_a_teacher_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="teacher.checkpoint"):
        Trainer(tiny_cfg("distill", tmp_path))
    # plain regression baseline: no teacher at all
    tr = Trainer(tiny_cfg("distill", tmp_path, **{"teacher.preset": None}))
    assert tr.teacher is None and set(tr.objective(fixed_batch(with_heatmaps=False))) == {"loss_kpt", "loss"}


# ----------------------------------------------------------------------------- exact resume


def _weights(path):
    # training checkpoints hold tensors, containers and numbers only: they load without unpickling code
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    assert a["trainer"]["global_step"] == b["trainer"]["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for (ka, sa), (kb, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (ka, name)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_resume_reaches_the_same_weights(tmp_path):
    over = {"ckpt_interval_steps": 2, "optim.epochs": 3, "optim.warmup_iters": 3, "optim.milestones": [2]}
    # uninterrupted: 3 epochs x 4 steps
    ref = Trainer(tiny_cfg("distill", tmp_path / "ref", **over), teacher=tiny_teacher_model())
    assert ref.fit()["global_step"] == 12
    ref_ck = _weights(tmp_path / "ref" / "last.pth")

    # killed after step 7 (last checkpoint at step 6, mid-epoch), with a data worker this time
    def kill(tr):
        if tr.global_step == 7:
            raise StopTraining

    run = tmp_path / "killed"
    tr = Trainer(tiny_cfg("distill", run, **over, **{"data.num_workers": 1}), hooks=[kill], teacher=tiny_teacher_model())
    with pytest.raises(StopTraining):
        tr.fit()
    ck = _weights(run / "last.pth")
    assert (ck["trainer"]["global_step"], ck["trainer"]["epoch"], ck["trainer"]["step_in_epoch"]) == (6, 1, 2)
    tr = Trainer(tiny_cfg("distill", run, **over), teacher=tiny_teacher_model())
    assert tr.fit(resume=str(run / "last.pth"))["global_step"] == 12
    _assert_same_state(ref_ck, _weights(run / "last.pth"))
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl") if '"train"' in l]
    assert steps == list(range(1, 13))  # replayed steps are not logged twice

    # stopped by max_steps at an odd step, then resumed
    run2 = tmp_path / "maxsteps"
    tr = Trainer(tiny_cfg("distill", run2, **over, max_steps=5), teacher=tiny_teacher_model())
    assert tr.fit()["finished"] is False
    tr = Trainer(tiny_cfg("distill", run2, **over), teacher=tiny_teacher_model())
    tr.fit(resume=str(run2 / "last.pth"))
    _assert_same_state(ref_ck, _weights(run2 / "last.pth"))

    # the weights load back for evaluation / inference / export, at the size they were trained at
    m = model_from_checkpoint(str(run / "last.pth"))
    assert m.name == "distilpose_tiny" and m.input_size == SMALL
    from distilpose.export import _load_model
    from distilpose.inference import load_model

    for m2 in (load_model(None, str(run / "last.pth"), device="cpu"),
               _load_model(argparse.Namespace(preset=None, checkpoint=str(run / "last.pth"), allow_random_weights=False))):
        assert m2.name == "distilpose_tiny" and m2.input_size == SMALL
        for k, v in m.state_dict().items():
            assert torch.equal(v, m2.state_dict()[k]), k

    # a checkpoint of an earlier version (numpy RNG keys as an array: needs full unpickling)
    # resumes with a warning, to the same state
    old = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    for r in old["rng"]:
        kind, keys, *rest = r["numpy"]
        r["numpy"] = (kind, keys.numpy().astype(np.uint32), *rest)
    torch.save(old, run2 / "old.pth")
    tr = Trainer(tiny_cfg("distill", run2, **over), teacher=tiny_teacher_model())
    with pytest.warns(UserWarning, match="full unpickling"):
        tr.resume(str(run2 / "old.pth"))
    assert np.array_equal(np.random.get_state()[1], old["rng"][0]["numpy"][1]) and tr.global_step == 12

    # resuming with another batch size is refused clearly
    with pytest.raises(ValueError, match="same world size and batch size"):
        Trainer(tiny_cfg("distill", run, **over, **{"data.batch_size": 8}), teacher=tiny_teacher_model()).resume(
            str(run / "last.pth")
        )


# ----------------------------------------------------------------------------- AMP / clipping / channels-last


def test_bf16_autocast_grad_clip_channels_last(tmp_path):
    tr = Trainer(tiny_cfg("distill", tmp_path, amp="bf16", channels_last=True, **{"optim.grad_clip": 0.5}),
                 teacher=tiny_teacher_model())
    assert tr.amp_dtype == torch.bfloat16 and not tr.scaler.is_enabled()
    out = tr.train_step(fixed_batch(with_heatmaps=False))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values()) and "grad_norm" in out
    with pytest.raises(ValueError, match="amp"):
        Trainer(tiny_cfg("teacher", tmp_path, amp="fp8"))


def test_fast_teacher_options_reach_the_distiller(tmp_path):
    teacher = tiny_teacher_model()
    tr = Trainer(tiny_cfg("distill", tmp_path, amp="bf16", **{"teacher.fold_bn": True, "teacher.dtype": "bf16"}),
                 teacher=teacher)
    t = tr.objective.teacher
    assert t is not teacher and {p.dtype for p in t.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.modules())
    out = tr.train_step(fixed_batch(with_heatmaps=False))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    with pytest.raises(ValueError, match="teacher.dtype"):
        Trainer(tiny_cfg("distill", tmp_path, **{"teacher.dtype": "int8"}), teacher=teacher)


# ----------------------------------------------------------------------------- DDP with torchrun (2 CPU processes, gloo)


def test_torchrun_two_process_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "-m", "distilpose", "train-teacher", "--config", "tiny_teacher", "--work-dir", str(tmp_path),
        "--no-progress", "--set", "data.kind=synthetic", "--set", "data.demo_num_train=16", "--set", "data.batch_size=4",
        "--set", "optim.epochs=1", "--set", "final_eval=false", "--set", "data.num_workers=0", "--set", "device=cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    sync = [r for r in recs if r["type"] == "ddp_sync"]
    assert len(sync) == 1 and sync[0]["world_size"] == 2
    d = sync[0]["param_digests"]
    assert len(d) == 2 and d[0] == d[1]
    # 16 samples / 2 ranks / batch 4 = 2 steps per epoch; images/s counts both ranks
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2]
    ck = _weights(tmp_path / "last.pth")
    assert ck["trainer"]["world_size"] == 2 and len(ck["rng"]) == 2
    # the written config is the resolved one
    assert yaml.safe_load(open(tmp_path / "config.yaml"))["data"]["kind"] == "synthetic"


def test_cli_print_config(capsys):
    from distilpose.cli import main

    assert main(["distill", "--config", "tiny_student", "--set", "optim.lr=0.01", "--epochs", "9", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.01 and cfg["optim"]["epochs"] == 9 and cfg["mode"] == "distill"
