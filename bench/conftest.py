"""pytest configuration for bench/ (pytest-benchmark suites).

Run: ``pytest bench --benchmark-only`` (add ``--benchmark-json bench/results/<name>.json``
to keep the numbers). GPU cases carry ``@pytest.mark.gpu`` and skip cleanly without CUDA.
``bench_*.py`` files are collected even when ``python_files`` only names ``test_*.py``.
Shared timing/metadata helpers live in ``bench/benchutils.py`` (``from benchutils import ...``).
"""
from __future__ import annotations

import fnmatch

import pytest
import torch


# ----------------------------------------------------------------------------- collection


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules unless python_files already does."""
    name = file_path.name
    if file_path.suffix != ".py" or not fnmatch.fnmatch(name, "bench_*.py"):
        return None
    patterns = parent.config.getini("python_files")
    if parent.session.isinitpath(file_path) or any(fnmatch.fnmatch(name, p) for p in patterns):
        return None  # the default python collector takes it (explicit paths always are)
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)




@pytest.fixture(autouse=True)
def _restore_matmul_tf32():
    """Cases that set ``torch.backends.cuda.matmul.allow_tf32`` set it directly; it is restored
    here. (pytest's monkeypatch cannot: that module answers the attribute from ``__getattr__``,
    and recent pytest then tries to delete it on undo.)"""
    old = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
