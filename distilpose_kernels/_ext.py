"""Lazy loader of the compiled extension ``distilpose_kernels._C``.

Nothing is loaded at package import: :func:`load` imports ``_C`` on first use (by
``distilpose_kernels.decode`` or ``info()``), which registers its CPU (and CUDA) kernels
with the PyTorch dispatcher. A missing or broken build is recorded, never raised: the ops
then run their pure-PyTorch implementations.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Optional

#: Set to 1 at runtime to ignore a built extension (the ops use their references).
DISABLE_ENV = "DISTILPOSE_DISABLE_EXTENSION"


@dataclass
class ExtensionStatus:
    loaded: bool = False
    path: Optional[str] = None
    error: Optional[str] = None
    cuda_built: bool = False
    built_with_torch: Optional[str] = None
    cuda_archs: Optional[str] = None
    ops: list[str] = field(default_factory=list)

    @property
    def dispatch_keys(self) -> tuple[str, ...]:
        """Dispatch keys that have compiled kernels ("CPU", and "CUDA" in a CUDA build)."""
        if not self.loaded:
            return ()
        return ("CPU", "CUDA") if self.cuda_built else ("CPU",)


_status: Optional[ExtensionStatus] = None


def load() -> ExtensionStatus:
    """Import ``_C`` once (registering its kernels) and return what happened."""
    global _status
    if _status is not None:
        return _status
    st = ExtensionStatus()
    from ._utils import env_switch

    if env_switch(DISABLE_ENV, False):
        st.error = f"disabled by {DISABLE_ENV}=1"
    else:
        try:
            import torch  # noqa: F401  (the library links against libtorch: load it first)

            mod = importlib.import_module("distilpose_kernels._C")
        except ImportError as exc:
            msg = str(exc)
            if "No module named" in msg:
                msg = ("not built (install with `pip install --no-build-isolation .`, "
                       "or DISTILPOSE_NO_EXTENSION=1 was set)")
            st.error = msg
        except OSError as exc:  # e.g. undefined symbols after a torch upgrade
            st.error = f"failed to load: {exc} (rebuild against the installed torch)"
        else:
            st.loaded = True
            st.path = getattr(mod, "__file__", None)
            st.cuda_built = bool(getattr(mod, "cuda_built", 0))
            st.built_with_torch = getattr(mod, "torch_version", None)
            archs = getattr(mod, "cuda_archs", None)  # built as 8.0_9.0+PTX (see setup.py)
            st.cuda_archs = archs.replace("_", ";") if archs else None
            st.ops = [o for o in getattr(mod, "ops", "").split(",") if o]
    _status = st
    return st


def available(device_type: str, ops: tuple = ()) -> bool:
    """Whether the compiled kernels serve tensors of ``device_type`` ("cpu" or "cuda") and the
    built library carries every op named in ``ops`` (an older build may lack newer ops)."""
    st = load()
    return (st.loaded and (device_type == "cpu" or (device_type == "cuda" and st.cuda_built))
            and all(o in st.ops for o in ops))


def require(op: str, backend: str, tensors: dict, ops: tuple = ()) -> None:
    """For an op asked for the compiled kernels explicitly (``backend`` "cpp" or "cuda"): every
    tensor in ``tensors`` (argument name -> tensor) on that device type, and the extension built
    for it with ``ops``; else a ValueError naming the argument, or a RuntimeError saying why the
    extension is unavailable."""
    want = "cpu" if backend == "cpp" else "cuda"
    for name, t in tensors.items():
        if t.device.type != want:
            raise ValueError(f"{op}: {name}: backend={backend!r} needs a {want} tensor, got one on {t.device}")
    if not available(want, ops):
        st = load()
        why = st.error or ("built without CUDA (rebuild with FORCE_CUDA=1 on a CUDA machine)"
                           if not st.cuda_built and want == "cuda"
                           else f"the built extension lacks {', '.join(ops)}; rebuild it")
        raise RuntimeError(f"{op}: backend={backend!r} requested but the compiled extension is unavailable: {why}")

