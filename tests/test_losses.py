"""Student and teacher losses against small hand-computed cases (spec 'Losses of the student')."""
import math

import pytest
import torch

import distilpose_kernels as dk
from distilpose.losses import keypoint_regression_loss, teacher_loss, token_mse_loss


def _gauss(x, y, mx, my, sx, sy):
    return math.exp(-((x - mx) ** 2 / (sx**2 + 1e-9) + (y - my) ** 2 / (sy**2 + 1e-9)) / 2)


def _hand_reg2hm(coords, sigma, t, kw, mode):
    """Straight loops over the spec's formula (no tensors ops beyond indexing)."""
    n, k, h, w = t.shape
    g = [[[[0.0] * w for _ in range(h)] for _ in range(k)] for _ in range(n)]
    wt = [[0.0] * k for _ in range(n)]
    for i in range(n):
        for j in range(k):
            mx, my = coords[i, j, 0].item() * w, coords[i, j, 1].item() * h
            sx, sy = sigma[i, j, 0].item(), sigma[i, j, 1].item()
            off = mx - 3 * sx >= w or my - 3 * sy >= h or mx + 3 * sx + 1 < 0 or my + 3 * sy + 1 < 0
            wt[i][j] = 0.0 if off else kw[i, j, 0].item()
            for y in range(h):
                for x in range(w):
                    g[i][j][y][x] = 0.0 if off else _gauss(x, y, mx, my, sx, sy)
    total = 0.0
    for j in range(k):
        if mode == "released":
            mw = sum(wt[i][j] ** 2 for i in range(n)) / n
            mm = sum((g[i][j][y][x] - t[i, j, y, x].item()) ** 2 for i in range(n) for y in range(h) for x in range(w))
            total += mw * mm / (n * h * w)
        else:
            s = sum((wt[i][j] * (g[i][j][y][x] - t[i, j, y, x].item())) ** 2 for i in range(n) for y in range(h) for x in range(w))
            total += s / (n * h * w)
    return total / k


@pytest.fixture
def case():
    torch.manual_seed(3)
    n, k, h, w = 3, 2, 5, 4
    coords = torch.tensor(
        [[[0.5, 0.4], [0.1, 0.9]], [[2.0, 0.5], [0.3, 0.3]], [[0.8, -0.9], [0.6, 0.2]]], dtype=torch.float64
    )  # sample 1 joint 0 lies wholly right of the grid; sample 2 joint 0 wholly above it
    sigma = torch.tensor([[[1.0, 1.5], [0.7, 2.0]], [[1.0, 1.0], [3.0, 0.5]], [[0.5, 0.5], [1.2, 0.9]]], dtype=torch.float64)
    t = torch.rand(n, k, h, w, dtype=torch.float64)
    kw = torch.tensor([[[1.0], [0.5]], [[1.0], [1.0]], [[0.0], [1.0]]], dtype=torch.float64)
    return coords, sigma, t, kw


@pytest.mark.parametrize("mode", ["released", "per_sample"])
def test_reg2hm_matches_hand_loops(case, mode):
    coords, sigma, t, kw = case
    got = dk.reg2hm_loss_reference(coords, sigma, t, kw, mode=mode)
    assert got.item() == pytest.approx(_hand_reg2hm(coords, sigma, t, kw, mode), rel=1e-12)


def test_released_and_per_sample_differ_with_unequal_weights_only(case):
    coords, sigma, t, kw = case
    a = dk.reg2hm_loss_reference(coords, sigma, t, kw, mode="released")
    b = dk.reg2hm_loss_reference(coords, sigma, t, kw, mode="per_sample")
    assert abs(a.item() - b.item()) > 1e-4
    inside = torch.rand(3, 2, 2, dtype=torch.float64) * 0.5 + 0.25
    ones = torch.ones(3, 2, 1, dtype=torch.float64)
    a = dk.reg2hm_loss_reference(inside, sigma, t, ones, mode="released")
    b = dk.reg2hm_loss_reference(inside, sigma, t, ones, mode="per_sample")
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_all_off_grid_gives_zero_maps_and_zero_loss():
    coords = torch.tensor([[[1.9, 0.5]], [[-1.0, 0.5]]], dtype=torch.float64)
    sigma = torch.full((2, 1, 2), 1.0, dtype=torch.float64)
    t = torch.rand(2, 1, 6, 5, dtype=torch.float64) + 0.1
    maps, in_grid = dk.heatmap.simulated_gaussians_reference(coords, sigma, 6, 5)
    assert in_grid.sum() == 0 and maps.abs().sum() == 0
    kw = torch.ones(2, 1, 1, dtype=torch.float64)
    for mode in ("released", "per_sample"):
        assert dk.reg2hm_loss_reference(coords, sigma, t, kw, mode=mode).item() == 0.0


def test_three_sigma_box_edges():
    # W = 4: a box [mu-3s, mu+3s+1] with ul_x exactly W is off, just below W is on.
    sigma = torch.ones(1, 2, 2, dtype=torch.float64)
    coords = torch.tensor([[[7.0 / 4, 0.5], [6.999 / 4, 0.5]]], dtype=torch.float64)
    _, in_grid = dk.heatmap.simulated_gaussians_reference(coords, sigma, 4, 4)
    assert in_grid.flatten().tolist() == [0.0, 1.0]


def test_score_loss_nearest_pixel_and_outside_range():
    t = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4).repeat(1, 3, 1, 1) / 12
    coords = torch.tensor([[[0.4, 0.8], [1.2, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    score = torch.tensor([[[0.9], [0.3], [0.2]]], dtype=torch.float64)
    kw = torch.tensor([[[1.0], [1.0], [0.5]]], dtype=torch.float64)
    # joint 0: px = round(0.4*3) = 1, py = round(0.8*2) = 2 -> value index 2*4+1 = 9
    # joint 1: x outside [0, 1] -> 0; joint 2: px 0, py 2 -> index 8
    expect = (abs(0.9 - 9 / 12) + abs(0.3 - 0.0) + abs(0.2 * 0.5 - 8 / 12 * 0.5)) / 3
    got = dk.score_loss_reference(coords, score, t, kw)
    assert got.item() == pytest.approx(expect, rel=1e-12)


def test_no_gradient_into_teacher_or_through_gather():
    coords = torch.rand(2, 3, 2, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, 3, 2, dtype=torch.float64) + 0.5).requires_grad_()
    score = torch.rand(2, 3, 1, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    kw = torch.ones(2, 3, 1, dtype=torch.float64)
    reg, sc = dk.simulated_heatmap_loss_reference(coords, sigma, score, t, kw)
    (reg + sc).backward()
    assert t.grad is None
    assert coords.grad is not None and sigma.grad is not None and score.grad is not None
    coords.grad = None
    dk.score_loss_reference(coords, score, t, kw).backward()
    assert coords.grad is None  # the gather index carries no gradient


def test_reg2hm_bad_mode_and_shapes():
    t = torch.rand(1, 2, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        dk.reg2hm_loss_reference(torch.rand(1, 2, 2), torch.rand(1, 2, 2), t, torch.ones(1, 2, 1), mode="x")
    with pytest.raises(ValueError, match="coords"):
        dk.reg2hm_loss_reference(torch.rand(1, 3, 2), torch.rand(1, 2, 2), t, torch.ones(1, 2, 1))


def test_keypoint_regression_smooth_l1_hand_case():
    pred = torch.tensor([[[0.5, 0.5], [3.0, 0.0]]])
    tgt = torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])
    w = torch.tensor([[[1.0], [0.5]]])
    # |d| = 0.5 -> 0.125; joint 1 weighted: 1.5 vs 0 -> |d| = 1.5 -> 1.0
    expect = (0.5 * 0.5**2 + 0 + (1.5 - 0.5) + 0) / 4
    assert keypoint_regression_loss(pred, tgt, w).item() == pytest.approx(expect)


def test_token_mse_and_shape_error():
    a, b = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    assert token_mse_loss(a, b).item() == 1.0
    with pytest.raises(ValueError, match="teacher tokens"):
        token_mse_loss(a, torch.zeros(1, 2, 4))


def test_joint_mse_per_sample_weights():
    pred = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[1.0, 1.0]], [[3.0, 1.0]]]])  # (2, 2, 1, 2)
    gt = torch.zeros_like(pred)
    w = torch.tensor([[[1.0], [1.0]], [[0.0], [2.0]]])
    # joint 0: (1 + 4 + 0 + 0) / 4; joint 1: (0 + 0 + 36 + 4) / 4; mean over joints
    expect = ((5 / 4) + (40 / 4)) / 2
    assert dk.joint_mse_loss(pred, gt, w).item() == pytest.approx(expect)
    out = teacher_loss({"heatmaps": pred}, {"heatmaps": gt, "heatmap_weight": w})
    assert out["loss"].item() == pytest.approx(expect)
