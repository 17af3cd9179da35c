"""Adversarial checks of regression_to_image (Triton kernel under the interpreter on CPU, and the
reference) against the data pipeline's own transforms: the decode must invert the affine crop the
dataset applies (rotation, non-square scale), the flip-test merge must match the dataset's flip
and the evaluation's merge; strided views of every input, 16/64-bit floats, the NaN policy, and
bad flip permutations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import distilpose_kernels as dk
from distilpose.data import transforms as T
from distilpose.data.targets import student_targets

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CROP = (256, 192)  # (H, W)
BACKENDS = ("triton", "reference")


def _boxes(n, k, seed):
    """Image keypoints (N, K, 2) inside non-square boxes, with rotations far from 0."""
    rng = np.random.default_rng(seed)
    center = rng.uniform(150, 450, (n, 2))
    scale = np.stack((rng.uniform(60, 300, n), rng.uniform(90, 420, n)), 1)  # w/h != 192/256 on purpose
    rot = rng.uniform(20, 80, n) * rng.choice((-1, 1), n)
    kp = center[:, None] + rng.uniform(-0.45, 0.45, (n, k, 2)) * scale[:, None]
    return kp, center, scale, rot


def _to_dev(*arrays, dtype=torch.float32):
    return [torch.as_tensor(a, dtype=dtype).to(DEV) for a in arrays]


def _targets(kp, center, scale, rot, flip_width=None, perm=None):
    """The student's regression targets (N, K, 2) as the dataset computes them (prepare())."""
    out = []
    for i in range(kp.shape[0]):
        c = center[i] if flip_width is None else np.array([flip_width - 1 - center[i][0], center[i][1]])
        m = T.get_affine_matrix(c, scale[i], rot[i], CROP, flip_width=flip_width)
        kc = T.affine_points(kp[i], m)
        if perm is not None:
            kc = kc[perm]
        out.append(student_targets(kc, np.ones(len(kc)), CROP)[0])
    return np.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(1, 17), (5, 133)])
def test_decode_inverts_the_dataset_affine_crop(n, k, backend):
    """Image keypoints -> the dataset's affine crop (rotation, non-square scale) -> targets
    (x / 192, y / 256, float32) -> regression_to_image: the image keypoints again."""
    kp, center, scale, rot = _boxes(n, k, seed=n * k)
    coords, c, s, r = _to_dev(_targets(kp, center, scale, rot), center, scale, rot)
    scores = torch.rand(n, k, device=DEV)
    got, sc = dk.regression_to_image(coords, scores, c, s, CROP, r, backend=backend)
    np.testing.assert_allclose(got.double().cpu().numpy(), kp, rtol=0, atol=1e-3)
    torch.testing.assert_close(sc, scores, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_merge_matches_the_dataset_flip(backend):
    """The dataset's flipped sample (mirrored image, mirrored centre, joints permuted) of an
    unrotated box is the original crop mirrored about W / 2 (x -> 1 - x normalised) with left and
    right swapped: merged with the unflipped targets it decodes to the image keypoints."""
    n, k, img_w = 3, 17, 640
    kp, center, scale, _ = _boxes(n, k, seed=7)
    rot = np.zeros(n)
    perm = T.flip_permutation(k)
    coords, flipped, c, s = _to_dev(_targets(kp, center, scale, rot),
                                    _targets(kp, center, scale, rot, flip_width=img_w, perm=perm), center, scale)
    # the flipped sample's centre is the mirrored one; the decode uses the original box
    np.testing.assert_allclose(1.0 - flipped[:, perm, 0].cpu().numpy(), coords[..., 0].cpu().numpy(), atol=1e-6)
    sc, fsc = torch.rand(n, k, device=DEV), torch.rand(n, k, device=DEV)
    perm_t = torch.as_tensor(perm, device=DEV)
    got, got_sc = dk.regression_to_image(coords, sc, c, s, CROP, None, flipped, fsc, perm_t, backend=backend)
    np.testing.assert_allclose(got.double().cpu().numpy(), kp, rtol=0, atol=1e-3)
    torch.testing.assert_close(got_sc, (sc + fsc[:, perm_t]) * 0.5, rtol=0, atol=1e-7)


def test_flip_merge_matches_the_evaluation_pipeline():
    """Same flip convention as distilpose.evaluation (predict_crops' merge + crops_to_image)."""
    from distilpose.evaluation.decode import flip_regression, swap_pairs
    from distilpose.evaluation.predict import crops_to_image

    g = torch.Generator().manual_seed(3)
    n, k = 4, 17
    coords, flipped = torch.rand(n, k, 2, generator=g), torch.rand(n, k, 2, generator=g)
    sc, fsc = torch.rand(n, k, 1, generator=g), torch.rand(n, k, 1, generator=g)
    center, scale = torch.rand(n, 2, generator=g) * 300 + 50, torch.rand(n, 2, generator=g) * 200 + 40
    want_c = (coords + flip_regression(flipped, T.COCO_FLIP_PAIRS)) * 0.5
    want_s = (sc + swap_pairs(fsc, T.COCO_FLIP_PAIRS))[..., 0] * 0.5
    want = crops_to_image(want_c.double().numpy(), center.double().numpy(), scale.double().numpy())
    perm = torch.as_tensor(T.flip_permutation(k))
    args = [t.to(DEV) for t in (coords, sc[..., 0], center, scale)] + [CROP, None] + [
        t.to(DEV) for t in (flipped, fsc[..., 0], perm)]
    for backend in BACKENDS:
        got, got_s = dk.regression_to_image(*args, backend=backend)
        np.testing.assert_allclose(got.double().cpu().numpy(), want, rtol=0, atol=1e-3)
        torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=1e-7)


def _blob_centroids(crop, pts):
    """Sub-pixel centre of each Gaussian blob of ``crop`` near ``pts`` (crop px, pixel centres at
    integers, as cv2.warpAffine): what a perfect model reads off the crop."""
    ys, xs = np.mgrid[0:crop.shape[0], 0:crop.shape[1]]
    out = []
    for x, y in pts:
        w = crop * (((xs - x) ** 2 + (ys - y) ** 2) < 15**2)
        out.append(((w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()))
    return np.array(out)


def _blob_case():
    img_h, img_w = 480, 640
    kp = np.array([[300.3, 200.6], [250.2, 260.1], [352.7, 258.4]])  # nose, left, right
    center, scale, rot = np.array([301.0, 240.0]), np.array([180.0, 230.0]), 25.0
    yy, xx = np.mgrid[0:img_h, 0:img_w]
    img = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)) for x, y in kp).astype(np.float32)
    m = T.get_affine_matrix(center, scale, rot, CROP)
    return kp, center, scale, rot, T.warp_crop(img, m, CROP), T.affine_points(kp, m)


def test_the_student_is_trained_on_pixel_centre_coordinates():
    """The regression target (dataset) is where the joint's image content lands in the warped crop,
    in pixel-centre coordinates: x_px / W with pixel j at x = j. The flip test's crop.flip(-1)
    therefore moves a joint at x to W - 1 - x, not W - x."""
    kp, center, scale, rot, crop, kc = _blob_case()
    np.testing.assert_allclose(_blob_centroids(crop, kc), kc, atol=0.02)
    mirrored = kc.copy()
    mirrored[:, 0] = CROP[1] - 1 - kc[:, 0]
    np.testing.assert_allclose(_blob_centroids(crop[:, ::-1], mirrored), mirrored, atol=0.02)


def test_flip_test_of_a_perfect_model_follows_the_specified_convention():
    """A perfect student (blob centres / crop size) on the crop and on crop.flip(-1), merged by
    regression_to_image. Without the flip test: the image keypoints to 1e-2 px. With it: the
    spec's (and the release's, mmpose 0.x) mirror x' = 1 - x, while crop.flip(-1) maps a pixel
    centre x to W - 1 - x; so the merge lands half a crop pixel right of the keypoint along the
    crop's x axis: exactly the no-flip decoding of the prediction moved by 0.5 / W. (mmpose 1.x
    uses 1 - 1/W - x; changing it would change the evaluation, the export and the engine.)"""
    kp, center, scale, rot, crop, kc = _blob_case()
    w, h = CROP[1], CROP[0]
    pred = _blob_centroids(crop, kc) / [w, h]
    mirrored = kc.copy()
    mirrored[:, 0] = w - 1 - kc[:, 0]
    perm = np.array([0, 2, 1])
    pred_f = (_blob_centroids(crop[:, ::-1], mirrored) / [w, h])[perm]
    c, f, cen, s, r = _to_dev(pred[None], pred_f[None], center[None], scale[None], [rot])
    ones = torch.ones(1, 3, device=DEV)
    no_flip, _ = dk.regression_to_image(c, ones, cen, s, CROP, r, backend="triton")
    np.testing.assert_allclose(no_flip[0].double().cpu().numpy(), kp, atol=1e-2)  # without the flip test: exact
    got, _ = dk.regression_to_image(c, ones, cen, s, CROP, r, f, ones, torch.as_tensor(perm, device=DEV),
                                    backend="triton")
    shifted, _ = dk.regression_to_image(c + torch.tensor([0.5 / w, 0.0], device=DEV, dtype=c.dtype), ones, cen, s,
                                        CROP, r, backend="triton")
    np.testing.assert_allclose(got[0].double().cpu().numpy(), shifted[0].double().cpu().numpy(), atol=1e-2)
    offset = np.linalg.norm(got[0].double().cpu().numpy() - kp, axis=-1)  # 0.5 crop px in image px
    np.testing.assert_allclose(offset, 0.5 * float(s[0, 0]) / w, rtol=0.05)


def _strided(t, g, dtype):
    """``t`` as a non-contiguous view of a larger buffer (every dimension strided, one reversed in memory)."""
    big = torch.randn(*(2 * d + 1 for d in t.shape), generator=g)
    big = big.to(DEV, t.dtype if not t.is_floating_point() else dtype)  # strided on the device itself
    view = big[tuple(slice(1, 2 * d + 1, 2) for d in t.shape)]
    if t.dim() >= 2:  # a transposed layout too
        view = big.transpose(0, 1)[tuple(slice(1, 2 * d + 1, 2) for d in (t.shape[1], t.shape[0]) + t.shape[2:])]
        view = view.transpose(0, 1)
    view.copy_(t.to(DEV, view.dtype))
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_input_strided_every_float_dtype(dtype):
    g = torch.Generator().manual_seed(11)
    n, k = 3, 9
    kp, center, scale, rot = _boxes(n, k, seed=1)
    base = dict(coords=torch.rand(n, k, 2, generator=g), scores=torch.randn(n, k, generator=g),
                center=torch.as_tensor(center).float(), scale=torch.as_tensor(scale).float(),
                rotation=torch.as_tensor(rot).float(), flipped_coords=torch.rand(n, k, 2, generator=g),
                flipped_scores=torch.randn(n, k, generator=g))
    args = {name: _strided(v, g, dtype) for name, v in base.items()}
    args["flip_perm"] = _strided(torch.randperm(k, generator=g), g, dtype)  # a strided index view
    got = dk.regression_to_image(crop_size=CROP, backend="triton", **args)
    want = dk.regression_to_image_reference(crop_size=CROP, **{n_: v.contiguous() for n_, v in args.items()})
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_nan_propagates_per_keypoint_and_per_row():
    """Policy (module docstring): a NaN prediction gives NaN for that keypoint only (and its flip
    partner's merge); a NaN center/scale/rotation gives NaN for that box's keypoints; no error."""
    n, k = 3, 5
    g = torch.Generator().manual_seed(5)
    perm = torch.tensor([0, 2, 1, 4, 3])
    c, f = torch.rand(n, k, 2, generator=g), torch.rand(n, k, 2, generator=g)
    s, fs = torch.rand(n, k, generator=g), torch.rand(n, k, generator=g)
    cen, sca, rot = torch.rand(n, 2, generator=g) * 100, torch.rand(n, 2, generator=g) * 100 + 10, torch.ones(n)
    c[0, 1, 0] = f[1, 3, 1] = s[2, 0] = float("nan")
    rot[2] = float("nan")
    c, s, cen, sca, rot, f, fs, perm = (t.to(DEV) for t in (c, s, cen, sca, rot, f, fs, perm))
    for backend in BACKENDS:
        kp, sc = dk.regression_to_image(c, s, cen, sca, CROP, rot, f, fs, perm, backend=backend)
        assert torch.isnan(kp).any(-1).nonzero().tolist() == [[0, 1], [1, 4]] + [[2, j] for j in range(k)]
        assert torch.isnan(sc).nonzero().tolist() == [[2, 0]]


@pytest.mark.interpreter
def test_flip_perm_out_of_range():
    """An index outside [0, K): a ValueError naming flip_perm on CPU tensors (no host sync needed);
    the kernel itself never reads out of bounds (NaN for that keypoint)."""
    from distilpose_kernels import keypoints_triton

    n, k = 2, 5
    c, s = torch.rand(n, k, 2), torch.rand(n, k)
    cen, sca = torch.rand(n, 2) * 100, torch.rand(n, 2) * 100 + 10
    for bad in ([0, 2, 1, 4, 5], [0, 2, 1, 4, -1], [0, 2, 1, 4, 1 << 40]):
        perm = torch.tensor(bad)
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=r"flip_perm: .*\[0, 5\)"):
                dk.regression_to_image(c, s, cen, sca, CROP, None, c, s, perm, backend=backend)
        kp, sc = keypoints_triton.regression_to_image(c, s, cen, sca, CROP, None, c, s, perm)
        want = dk.regression_to_image_reference(c, s, cen, sca, CROP, None, c, s, perm.clamp(0, k - 1))
        assert torch.isnan(kp[:, 4]).all() and torch.isnan(sc[:, 4]).all()
        torch.testing.assert_close(kp[:, :4], want[0][:, :4], rtol=0, atol=1e-3)
        torch.testing.assert_close(sc[:, :4], want[1][:, :4], rtol=0, atol=0)


def test_compile_fullgraph_with_flip_rotation_and_int32_perm():
    g = torch.Generator().manual_seed(2)
    n, k = 2, 17
    c, f = torch.rand(n, k, 2, generator=g), torch.rand(n, k, 2, generator=g)
    s, fs = torch.rand(n, k, generator=g), torch.rand(n, k, generator=g)
    cen, sca = torch.rand(n, 2, generator=g) * 100, torch.rand(n, 2, generator=g) * 100 + 10
    rot = torch.randn(n, generator=g) * 30
    perm = torch.as_tensor(T.flip_permutation(k), dtype=torch.int32)
    c, f, s, fs, cen, sca, rot, perm = (t.to(DEV) for t in (c, f, s, fs, cen, sca, rot, perm))
    fn = torch.compile(lambda c, f: dk.regression_to_image(c, s, cen, sca, CROP, rot, f, fs, perm, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    want = dk.regression_to_image_reference(c, s, cen, sca, CROP, rot, f, fs, perm)
    for a, b in zip(fn(c, f), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    torch.library.opcheck(torch.ops.distilpose.regression_to_image.default,
                          (c.bfloat16(), s, cen, sca, 256, 192, rot, f.bfloat16(), fs, perm, "triton"))
