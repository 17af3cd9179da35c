"""Bad input to the `distilpose` CLI, to the DISTILPOSE_* switches and to setup.py's build switches:
a clear one-line error (argparse style, exit code 2 for the CLI), never a silent fallback or a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from distilpose import cli
from distilpose_kernels import _utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("argv, flag", [
    (["smoke", "--batch", "-1"], "--batch"),
    (["smoke", "--batch", "0"], "--batch"),
    (["make-data", "--num-train", "-5"], "--num-train"),
    (["train-teacher", "--epochs", "0", "--print-config"], "--epochs"),
    (["train-teacher", "--batch-size", "-1", "--print-config"], "--batch-size"),
    (["distill", "--lr", "-1", "--print-config"], "--lr"),
    (["distill", "--epochs", "-3", "--print-config"], "--epochs"),
    (["demo", "--student-epochs", "0"], "--student-epochs"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--time-budget", "-5"], "--time-budget"),
    (["ablate", "--epochs", "0"], "--epochs"),
    (["eval", "--checkpoint", "/nonexistent/x.pth"], "--checkpoint"),
    (["eval", "--checkpoint", __file__, "--batch-size", "-1"], "--batch-size"),
    (["infer", "--checkpoint", "/nonexistent/x.pth", "--out", "o", "a.jpg"], "--checkpoint"),
    (["export", "--out", "x.onnx", "--batch", "-1"], "--batch"),
    (["export", "--checkpoint", "/nonexistent/x.pth", "--out", "x.onnx"], "--checkpoint"),
    (["train-teacher", "--config-file", "/nonexistent/c.yaml"], "--config-file"),
    (["train-teacher", "--resume", "/nonexistent/last.pth"], "--resume"),
    (["distill", "--teacher-checkpoint", "/nonexistent/t.pth"], "--teacher-checkpoint"),
])
def test_cli_bad_values_exit_2_naming_the_flag(capsys, argv, flag):
    line = _cli_error(capsys, argv)
    assert line.startswith(f"distilpose {argv[0]}: error:") and flag in line, line


def test_cli_unknown_command_exit_2(capsys):
    assert "unknown command" in _cli_error(capsys, ["bogus"])


@pytest.mark.parametrize("value, expect", [("1", True), ("  1 ", True), ("YES", True), ("on", True),
                                           ("0", False), ("false", False), ("", False)])
def test_env_flag_values(monkeypatch, value, expect):
    monkeypatch.setenv("DISTILPOSE_FORCE_REFERENCE", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _utils.force_reference() is expect


@pytest.mark.parametrize("value", ["2", "garbage", "enable"])
def test_env_flag_garbage_warns(monkeypatch, value):
    monkeypatch.setenv("DISTILPOSE_FORCE_REFERENCE", value)
    with pytest.warns(RuntimeWarning, match="DISTILPOSE_FORCE_REFERENCE"):
        assert _utils.force_reference() is False
    monkeypatch.setenv("DISTILPOSE_ATTN_AUTOTUNE", value)
    with pytest.warns(RuntimeWarning, match="DISTILPOSE_ATTN_AUTOTUNE"):
        assert _utils.env_switch("DISTILPOSE_ATTN_AUTOTUNE", True) is True


def _py(code, env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def test_disable_extension_garbage_is_reported():
    r = _py("from distilpose_kernels import _ext; print(_ext.load().loaded)",
            {"DISTILPOSE_DISABLE_EXTENSION": "garbage"})
    assert r.returncode == 0, r.stderr
    assert "DISTILPOSE_DISABLE_EXTENSION" in r.stderr and "garbage" in r.stderr


def test_disable_extension_zero_does_not_disable():
    r = _py("from distilpose_kernels import _ext; print(_ext.load().error)", {"DISTILPOSE_DISABLE_EXTENSION": " 0 "})
    assert "disabled by" not in r.stdout


@pytest.mark.parametrize("var", ["FORCE_CUDA", "DISTILPOSE_NO_EXTENSION"])
def test_setup_rejects_garbage_switch(var):
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env={**os.environ, var: "maybe"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert var in r.stderr and "maybe" in r.stderr and "Traceback" not in r.stderr


def test_setup_rejects_bad_max_jobs():
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env={**os.environ, "MAX_JOBS": "-2"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "MAX_JOBS" in r.stderr and "Traceback" not in r.stderr
