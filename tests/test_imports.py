"""Importing and using the packages on a machine with no GPU, no Triton and no compiled extension."""
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_and_forward_without_triton_or_extension():
    res = _run(
        """
        import sys
        sys.modules["triton"] = None                   # import triton -> ImportError
        sys.modules["distilpose_kernels._C"] = None    # compiled extension absent
        import torch
        import distilpose_kernels as dk
        import distilpose
        from distilpose.models import build_model
        from distilpose.models.distiller import Distiller
        assert "triton" not in [m for m, v in sys.modules.items() if v is not None]
        s, t = build_model("distilpose_tiny"), build_model("tokenpose_tiny")
        batch = {"img": torch.randn(1, 3, 256, 192), "target_coords": torch.rand(1, 17, 2),
                 "target_weight": torch.ones(1, 17, 1)}
        Distiller(s, t)(batch)["loss"].backward()
        hm = torch.rand(1, 17, 64, 48)
        dk.soft_argmax(hm)
        dk.decode_heatmaps(hm)
        dk.gaussian_heatmap_targets(torch.rand(1, 17, 2) * 100, torch.ones(1, 17), (256, 192), (64, 48))
        assert not torch.cuda.is_initialized(), "a GPU was queried"
        print("OK")
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")


def test_package_import_is_lazy():
    res = _run(
        """
        import sys, torch
        import distilpose_kernels, distilpose
        loaded = [m for m in sys.modules if m.startswith(("triton", "distilpose_kernels."))]
        print(sorted(loaded))
        assert not any(m.startswith("triton") for m in loaded), loaded
        assert "distilpose_kernels._C" not in loaded, loaded
        assert not torch.cuda.is_initialized()
        """
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout


def test_kernels_package_does_not_import_model_package():
    res = _run(
        """
        import sys
        import distilpose_kernels as dk
        for name in list(dk._LAZY.values()):
            __import__("distilpose_kernels." + name)
        assert not any(m == "distilpose" or m.startswith("distilpose.") for m in sys.modules), "distilpose imported"
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
