"""Static checks of the code that CI cannot run: the GPU-only branches of the library, the
benchmarks and the GPU check script execute only on a CUDA machine, so a misspelt or missing
name there would first fail during a (scarce) GPU run. pyflakes finds those names without
running anything."""
from __future__ import annotations

import pathlib

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages  # noqa: E402
from pyflakes.reporter import Reporter  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = ("distilpose", "distilpose_kernels", "bench", "tests", "tools", "scripts")
# the message kinds that are bugs at run time (unused imports and the like are style)
ERRORS = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport,
          messages.DuplicateArgument, messages.ReturnOutsideFunction)


class _Collect(Reporter):
    def __init__(self):
        self.found: list = []
        self.syntax: list = []

    def flake(self, message):
        if isinstance(message, ERRORS):
            self.found.append(f"{message.filename}:{message.lineno}: {message.message % message.message_args}")

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 (pyflakes' API)
        self.syntax.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename, msg):  # noqa: N802
        self.syntax.append(f"{filename}: {msg}")


def _python_files() -> list:
    files = [ROOT / "setup.py"]
    for tree in TREES:
        files += sorted(p for p in (ROOT / tree).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_no_undefined_names_in_code_ci_does_not_run():
    files = _python_files()
    assert len(files) > 50, files  # the trees are there
    rep = _Collect()
    for f in files:
        pyflakes_api.checkPath(str(f), rep)
    assert not rep.syntax, rep.syntax
    assert not rep.found, "\n".join(rep.found)


def test_the_check_finds_an_undefined_name(tmp_path):
    """The check above can fail: a GPU-only branch using a name never imported is reported."""
    bad = tmp_path / "gpu_only.py"
    bad.write_text("import torch\n\ndef f():\n    if torch.cuda.is_available():\n        return hm.loss()\n")
    rep = _Collect()
    pyflakes_api.checkPath(str(bad), rep)
    assert len(rep.found) == 1 and "undefined name 'hm'" in rep.found[0]


def test_gpu_tests_in_interpreter_modules_are_not_skipped_on_a_gpu_machine(monkeypatch):
    """On a GPU machine (no TRITON_INTERPRET) the conftest skips the "interpreter" tests, which run
    Triton kernels on CPU tensors; a gpu-marked test in a module marked "interpreter" as a whole
    (tests/test_heads.py, tests/test_targets.py) must still run there: it is the GPU run's check."""
    import sys

    import torch

    conftest = sys.modules.get("conftest")
    if conftest is None or not hasattr(conftest, "pytest_collection_modifyitems"):
        pytest.skip("tests/conftest.py is not importable as 'conftest' here")

    class Item:
        def __init__(self, *marks):
            self.keywords = {m: True for m in marks}
            self.skipped = False

        def add_marker(self, mark):
            self.skipped = self.skipped or mark.name == "skip"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    items = {"interp": Item("interpreter"), "gpu_in_interp": Item("interpreter", "gpu"), "gpu": Item("gpu"),
             "plain": Item()}
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    assert items["interp"].skipped
    assert not items["gpu_in_interp"].skipped and not items["gpu"].skipped and not items["plain"].skipped
