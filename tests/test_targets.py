"""Teacher training targets (msra / unbiased / udp) vs an independent per-sample numpy loop.

The numpy loops below follow mmpose 0.x TopDownGenerateTarget (_msra_generate_target with and
without unbiased_encoding, _udp_generate_target GaussianHeatmap mode) statement by statement,
one sample and one keypoint at a time.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose_kernels import heatmap_triton as hmt  # noqa: F401  (kernels defined under the interpreter)
from distilpose_kernels import targets as tg

pytestmark = pytest.mark.interpreter

# ----------------------------------------------------------------------------- numpy loops (mmpose)


def _np_msra(joints, vis, image_size, heatmap_size, sigma, unbiased):
    """One sample. joints (K, 2) input px, vis (K,); image_size/heatmap_size are (w, h) like mmpose."""
    num_joints = joints.shape[0]
    image_size = np.array(image_size)
    W, H = heatmap_size
    target_weight = np.zeros((num_joints, 1), dtype=np.float32)
    target = np.zeros((num_joints, H, W), dtype=np.float32)
    tmp_size = sigma * 3
    if unbiased:
        for joint_id in range(num_joints):
            target_weight[joint_id] = vis[joint_id]
            feat_stride = image_size / [W, H]
            mu_x = joints[joint_id][0] / feat_stride[0]
            mu_y = joints[joint_id][1] / feat_stride[1]
            ul = [mu_x - tmp_size, mu_y - tmp_size]
            br = [mu_x + tmp_size + 1, mu_y + tmp_size + 1]
            if ul[0] >= W or ul[1] >= H or br[0] < 0 or br[1] < 0:
                target_weight[joint_id] = 0
            if target_weight[joint_id] == 0:
                continue
            x = np.arange(0, W, 1, np.float32)
            y = np.arange(0, H, 1, np.float32)
            y = y[:, None]
            if target_weight[joint_id] > 0.5:
                target[joint_id] = np.exp(-((x - mu_x) ** 2 + (y - mu_y) ** 2) / (2 * sigma**2))
    else:
        for joint_id in range(num_joints):
            target_weight[joint_id] = vis[joint_id]
            feat_stride = image_size / [W, H]
            mu_x = int(joints[joint_id][0] / feat_stride[0] + 0.5)
            mu_y = int(joints[joint_id][1] / feat_stride[1] + 0.5)
            ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
            br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
            if ul[0] >= W or ul[1] >= H or br[0] < 0 or br[1] < 0:
                target_weight[joint_id] = 0
            if target_weight[joint_id] > 0.5:
                size = 2 * tmp_size + 1
                x = np.arange(0, size, 1, np.float32)
                y = x[:, None]
                x0 = y0 = size // 2
                g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
                g_x = max(0, -ul[0]), min(br[0], W) - ul[0]
                g_y = max(0, -ul[1]), min(br[1], H) - ul[1]
                img_x = max(0, ul[0]), min(br[0], W)
                img_y = max(0, ul[1]), min(br[1], H)
                target[joint_id][img_y[0] : img_y[1], img_x[0] : img_x[1]] = g[g_y[0] : g_y[1], g_x[0] : g_x[1]]
    return target, target_weight


def _np_udp(joints, vis, image_size, heatmap_size, factor):
    num_joints = joints.shape[0]
    image_size = np.array(image_size, dtype=np.float64)
    heatmap_size = np.array(heatmap_size)
    target_weight = np.ones((num_joints, 1), dtype=np.float32)
    target_weight[:, 0] = vis
    target = np.zeros((num_joints, heatmap_size[1], heatmap_size[0]), dtype=np.float32)
    tmp_size = factor * 3
    size = 2 * tmp_size + 1
    x = np.arange(0, size, 1, np.float32)
    y = x[:, None]
    for joint_id in range(num_joints):
        feat_stride = (image_size - 1.0) / (heatmap_size - 1.0)
        mu_x = int(joints[joint_id][0] / feat_stride[0] + 0.5)
        mu_y = int(joints[joint_id][1] / feat_stride[1] + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= heatmap_size[0] or ul[1] >= heatmap_size[1] or br[0] < 0 or br[1] < 0:
            target_weight[joint_id] = 0
            continue
        mu_x_ac = joints[joint_id][0] / feat_stride[0]
        mu_y_ac = joints[joint_id][1] / feat_stride[1]
        x0 = y0 = size // 2
        x0 += mu_x_ac - mu_x
        y0 += mu_y_ac - mu_y
        g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * factor**2))
        g_x = max(0, -ul[0]), min(br[0], heatmap_size[0]) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], heatmap_size[1]) - ul[1]
        img_x = max(0, ul[0]), min(br[0], heatmap_size[0])
        img_y = max(0, ul[1]), min(br[1], heatmap_size[1])
        v = target_weight[joint_id]
        if v > 0.5:
            target[joint_id][img_y[0] : img_y[1], img_x[0] : img_x[1]] = g[g_y[0] : g_y[1], g_x[0] : g_x[1]]
    return target, target_weight


def numpy_targets(keypoints, visibility, input_size, heatmap_size, sigma, encoding):
    """Per-sample loop over the batch; sizes (h, w) like our API (converted to mmpose's (w, h))."""
    kp = keypoints.numpy().astype(np.float32)
    vis = visibility.reshape(kp.shape[0], kp.shape[1]).numpy().astype(np.float32)
    image_wh = [input_size[1], input_size[0]]
    heat_wh = [heatmap_size[1], heatmap_size[0]]
    maps, weights = [], []
    for i in range(kp.shape[0]):
        if encoding == "udp":
            t, w = _np_udp(kp[i], vis[i], image_wh, heat_wh, sigma)
        else:
            t, w = _np_msra(kp[i], vis[i], image_wh, heat_wh, sigma, unbiased=(encoding == "unbiased"))
        maps.append(t)
        weights.append(w)
    return torch.from_numpy(np.stack(maps)), torch.from_numpy(np.stack(weights))


# ----------------------------------------------------------------------------- data


def _keypoints(n, k, input_size, seed=0):
    """Keypoints spread over and around the crop: off-grid ones, edges, invisible, soft visibility."""
    g = torch.Generator().manual_seed(seed)
    ih, iw = input_size
    kp = torch.rand(n, k, 2, generator=g) * torch.tensor([iw * 1.5, ih * 1.5]) - torch.tensor([iw * 0.25, ih * 0.25])
    vis = (torch.rand(n, k, generator=g) > 0.25).float()
    specials = [
        ([-40.0, 10.0], 1.0),  # far left: off grid
        ([0.0, 0.0], 1.0),  # corner
        ([iw - 1.0, ih - 1.0], 1.0),  # far corner
        ([iw + 30.0, ih * 0.5], 1.0),  # right, off grid for sigma 2 and stride 4
        ([-9.0, -9.0], 1.0),  # slightly outside: window still on grid
        (None, 0.3),  # soft: weight kept, Gaussian not drawn (mmpose: drawn only above 0.5)
        (None, 0.0),
    ]
    for j, (xy, v) in enumerate(specials[:k]):
        if xy is not None:
            kp[0, j] = torch.tensor(xy)
        vis[0, j] = v
    return kp, vis


CASES = [
    # (n, k, input (h, w), heatmap (h, w), sigma)
    (2, 17, (256, 192), (64, 48), 2.0),
    (1, 7, (100, 75), (25, 19), 1.5),
    (3, 5, (37, 29), (9, 7), 1.0),
]


_needs_ext = pytest.mark.skipif(not tg.extension_targets_available("cpu"),
                                reason="the compiled extension (targets op) is not built")
_EXT = ("cpp",) if tg.extension_targets_available("cpu") else ()


@pytest.mark.parametrize("encoding", ["msra", "unbiased", "udp"])
@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cpp", marks=_needs_ext)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[3][0]}x{c[3][1]}-s{c[4]}")
def test_targets_match_numpy_loop(encoding, backend, case):
    n, k, ins, hms, sigma = case
    kp, vis = _keypoints(n, k, ins, seed=n * 100 + k)
    ref_maps, ref_w = numpy_targets(kp, vis, ins, hms, sigma, encoding)
    assert ref_maps.abs().sum() > 0 and (ref_w == 0).any() and (ref_w > 0).any()  # the case is non-trivial
    maps, w = dk.gaussian_heatmap_targets(kp, vis, ins, hms, sigma, encoding, backend=backend)
    assert maps.shape == (n, k) + tuple(hms) and maps.dtype == torch.float32
    assert w.shape == (n, k, 1) and w.dtype == torch.float32
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=2e-5)


def test_targets_hand_values():
    # unbiased: centre exactly at heatmap pixel (x=3, y=2) -> peak 1 there, exp(-1/8) next to it
    kp = torch.tensor([[[3 * 4.0, 2 * 4.0]]])
    for backend in ("reference", "triton") + _EXT:
        m, w = dk.gaussian_heatmap_targets(kp, torch.ones(1, 1), (32, 24), (8, 6), 2.0, "unbiased", backend=backend)
        assert float(m[0, 0, 2, 3]) == pytest.approx(1.0, abs=1e-6)
        assert float(m[0, 0, 2, 4]) == pytest.approx(np.exp(-1 / 8), abs=1e-6)
        assert float(w) == 1.0
        # msra: x = 13 px -> 13/4 + 0.5 = 3.75 -> int 3; window radius 6 covers the whole 8x6 grid
        m2, _ = dk.gaussian_heatmap_targets(kp + 1.0, torch.ones(1, 1), (32, 24), (8, 6), 2.0, "msra", backend=backend)
        assert int(m2[0, 0].argmax()) == 2 * 6 + 3
        assert float(m2[0, 0, 0, 0]) == pytest.approx(np.exp(-(9 + 4) / 8), abs=1e-6)


def test_targets_visibility_3d_joint_weights_and_nonfinite():
    kp, vis = _keypoints(2, 6, (64, 48))
    kp[1, 0, 0] = float("nan")
    kp[1, 1, 1] = float("inf")
    vis[1, :2] = 1.0
    jw = torch.linspace(0.5, 1.5, 6)
    for backend in ("reference", "triton") + _EXT:
        m, w = dk.gaussian_heatmap_targets(kp, vis[..., None], (64, 48), (16, 12), 2.0, "msra", jw, backend=backend)
        assert torch.isfinite(m).all()
        assert (w[1, :2] == 0).all() and (m[1, :2] == 0).all()
        m0, w0 = dk.gaussian_heatmap_targets(kp, vis, (64, 48), (16, 12), 2.0, "msra", backend=backend)
        torch.testing.assert_close(w, w0 * jw.view(1, 6, 1))
        torch.testing.assert_close(m, m0)


def test_targets_module_and_default_encoding():
    kp, vis = _keypoints(2, 17, (256, 192))
    mod = dk.GaussianHeatmapTargets((256, 192), (64, 48), sigma=2.0, encoding="udp")
    m, w = mod(kp, vis)
    m2, w2 = dk.gaussian_heatmap_targets(kp, vis, (256, 192), (64, 48), 2.0, "udp")
    torch.testing.assert_close(m, m2)
    torch.testing.assert_close(w, w2)
    m3, _ = dk.gaussian_heatmap_targets(kp, vis, (256, 192), (64, 48))
    m4, _ = dk.gaussian_heatmap_targets(kp, vis, (256, 192), (64, 48), 2.0, "unbiased")
    torch.testing.assert_close(m3, m4)  # the spec's teacher target is the default
    assert "udp" in repr(mod)


def test_targets_kernel_overwrites_poisoned_outputs(monkeypatch):
    def nan_alloc(*args, **kwargs):
        return torch.full(*args, float("nan"), **kwargs)

    monkeypatch.setattr(hmt, "_alloc", nan_alloc)
    kp, vis = _keypoints(2, 5, (37, 29))
    for enc in tg.TARGET_ENCODINGS:
        m, w = dk.gaussian_heatmap_targets(kp, vis, (37, 29), (9, 7), 1.0, enc, backend="triton")
        assert not torch.isnan(m).any() and not torch.isnan(w).any()
        ref_m, ref_w = numpy_targets(kp, vis, (37, 29), (9, 7), 1.0, enc)
        torch.testing.assert_close(m, ref_m, rtol=0, atol=2e-5)


def test_targets_opcheck():
    kp, vis = _keypoints(1, 3, (20, 16))
    for enc in range(3):
        torch.library.opcheck(tg._simhm_targets, (kp, vis, 20, 16, 5, 4, 2.0, enc))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(keypoints=torch.rand(2, 3, 3)), ValueError, "keypoints"),
        (dict(keypoints=torch.randint(0, 5, (2, 3, 2))), TypeError, "keypoints"),
        (dict(visibility=torch.ones(2, 4)), ValueError, "visibility"),
        (dict(input_size=(64,)), ValueError, "input_size"),
        (dict(heatmap_size=(16, 0)), ValueError, "heatmap_size"),
        (dict(heatmap_size=(16, 1), encoding="udp"), ValueError, "heatmap_size"),
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
        (dict(encoding="dark"), ValueError, "encoding"),
        (dict(joint_weights=torch.ones(4)), ValueError, "joint_weights"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_targets_bad_inputs(kwargs, exc, match):
    args = dict(
        keypoints=torch.rand(2, 3, 2) * 40,
        visibility=torch.ones(2, 3),
        input_size=(64, 48),
        heatmap_size=(16, 12),
        sigma=2.0,
        encoding="msra",
    )
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dk.gaussian_heatmap_targets(**args)


# ----------------------------------------------------------------------------- the compiled extension


@_needs_ext
@pytest.mark.parametrize("encoding", tg.TARGET_ENCODINGS)
def test_targets_extension_k133_odd_sizes_batch1(encoding):
    """The extension's CPU kernel (the CUDA kernel's mirror) at K=133 (whole-body), batch 1 and
    odd sizes, against the numpy loop and bit-for-bit weights."""
    for n, k, ins, hms, sigma in ((1, 133, (256, 192), (64, 48), 2.0), (2, 17, (61, 47), (15, 11), 1.3)):
        kp, vis = _keypoints(n, k, ins, seed=k)
        want_m, want_w = numpy_targets(kp, vis, ins, hms, sigma, encoding)
        m, w = dk.gaussian_heatmap_targets(kp, vis, ins, hms, sigma, encoding, backend="cpp")
        torch.testing.assert_close(w, want_w, rtol=0, atol=0)
        torch.testing.assert_close(m, want_m, rtol=0, atol=2e-5)


@_needs_ext
def test_targets_extension_writes_every_element():
    """The C++ op allocates its outputs uninitialised: every element must be written. Each call
    follows a freed NaN-filled tensor of the same size, whose memory the allocator may hand back."""
    kp, vis = _keypoints(3, 9, (37, 29))
    for enc in tg.TARGET_ENCODINGS:
        junk = torch.full((3, 9, 9, 7), float("nan"))
        del junk
        m, w = dk.gaussian_heatmap_targets(kp, vis, (37, 29), (9, 7), 1.0, enc, backend="cpp")
        assert torch.isfinite(m).all() and torch.isfinite(w).all()
        ref_m, ref_w = numpy_targets(kp, vis, (37, 29), (9, 7), 1.0, enc)
        torch.testing.assert_close(m, ref_m, rtol=0, atol=2e-5)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=0)


@_needs_ext
def test_targets_extension_opcheck_and_default_on_cpu_is_reference():
    kp, vis = _keypoints(1, 3, (20, 16))
    for enc in range(3):
        torch.library.opcheck(torch.ops.distilpose.simhm_targets_ext.default, (kp, vis, 20, 16, 5, 4, 2.0, enc))
    # on CPU tensors "auto" stays on the vectorised reference (the extension is the CUDA default)
    assert tg._targets_backend(kp, vis, None) == "reference"
    assert tg._targets_backend(kp, vis, "cpp") == "extension"


@_needs_ext
@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.rand(2, 3, 3), torch.ones(2, 3), 64, 48, 16, 12, 2.0, 0), "keypoints: expected shape"),
        ((torch.rand(2, 3, 2).double(), torch.ones(2, 3), 64, 48, 16, 12, 2.0, 0), "keypoints: expected float32"),
        ((torch.rand(3, 2, 2).transpose(0, 1), torch.ones(2, 3), 64, 48, 16, 12, 2.0, 0), "keypoints: expected a contiguous"),
        ((torch.rand(2, 3, 2), torch.ones(2, 4), 64, 48, 16, 12, 2.0, 0), "visibility: expected shape"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3, dtype=torch.float16), 64, 48, 16, 12, 2.0, 0), "visibility: expected float32"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3), 64, 48, 16, 12, 2.0, 3), "encoding"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3), 64, 48, 16, 1, 2.0, 2), "heatmap_size"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3), 0, 48, 16, 12, 2.0, 0), "input_size"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3), 64, 48, 16, 12, float("nan"), 0), "sigma"),
        ((torch.rand(2, 3, 2), torch.ones(2, 3), 64, 48, 16, 12, -1.0, 1), "sigma"),
    ],
)
def test_targets_extension_op_errors_name_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.distilpose.simhm_targets_ext.default(*args)


def test_targets_backend_cuda_on_cpu_tensors_and_unknown_backend():
    kp, vis = torch.rand(2, 3, 2) * 40, torch.ones(2, 3)
    with pytest.raises(ValueError, match="keypoints: backend='cuda' needs a cuda tensor"):
        dk.gaussian_heatmap_targets(kp, vis, (64, 48), (16, 12), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        dk.gaussian_heatmap_targets(kp, vis, (64, 48), (16, 12), backend="numpy")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and tg.extension_targets_available("cuda")),
                    reason="needs a GPU and the extension built with CUDA")
@pytest.mark.parametrize("encoding", tg.TARGET_ENCODINGS)
def test_gpu_targets_extension_matches_numpy_and_triton(encoding):
    """The CUDA kernel: the default on CUDA. Against the numpy loop (weights exact, maps to 2e-5)
    and the Triton kernel; odd sizes take the scalar-store path, 64x48 the 16-byte one; poisoned
    memory."""
    for n, k, ins, hms, sigma in ((64, 17, (256, 192), (64, 48), 2.0), (1, 133, (61, 47), (15, 11), 1.3),
                                  (3, 5, (37, 29), (9, 7), 1.0)):
        kp, vis = _keypoints(n, k, ins, seed=n + k)
        want_m, want_w = numpy_targets(kp, vis, ins, hms, sigma, encoding)
        junk = torch.full((n, k) + hms, float("nan"), device="cuda")
        del junk
        assert tg._targets_backend(kp.cuda(), vis.cuda(), None) == "extension"
        m, w = dk.gaussian_heatmap_targets(kp.cuda(), vis.cuda(), ins, hms, sigma, encoding)
        torch.testing.assert_close(w.cpu(), want_w, rtol=0, atol=0)
        torch.testing.assert_close(m.cpu(), want_m, rtol=0, atol=2e-5)
        # the Triton kernel agrees wherever both draw the same keypoints (its float32 division is
        # approximate on the GPU: a keypoint exactly on a window boundary may round the other way)
        mt, wt = dk.gaussian_heatmap_targets(kp.cuda(), vis.cuda(), ins, hms, sigma, encoding, backend="triton")
        same = (w == wt)[..., 0]  # (N, K)
        assert same.float().mean() > 0.99
        torch.testing.assert_close(m[same], mt[same], rtol=0, atol=2e-6)
