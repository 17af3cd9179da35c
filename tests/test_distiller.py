"""Distiller: frozen teacher outside the student's parameters, the five weighted terms, switches."""
import pytest
import torch

from distilpose.losses import keypoint_regression_loss, token_mse_loss
from distilpose.models import build_model
from distilpose.models.distiller import Distiller, LossWeights
import distilpose_kernels as dk


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(n, 3, 256, 192, generator=g),
        "target_coords": torch.rand(n, 17, 2, generator=g),
        "target_weight": (torch.rand(n, 17, 1, generator=g) > 0.3).float(),
    }


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return build_model("distilpose_tiny"), build_model("tokenpose_tiny")


def test_teacher_outside_parameters_and_state_dict(pair):
    student, teacher = pair
    d = Distiller(student, teacher)
    assert {id(p) for p in d.parameters()} == {id(p) for p in student.parameters()}
    assert all(k.startswith("student.") for k in d.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())
    d.train()
    assert student.training and not teacher.training


def test_weighted_terms_match_spec_and_gradients(pair):
    student, teacher = pair
    d = Distiller(student, teacher).train()
    batch = _batch()
    student.zero_grad(set_to_none=True)
    losses = d(batch)
    assert set(losses) == {"loss", "loss_kpt", "loss_vis_token", "loss_kpt_token", "loss_reg2hm", "loss_score"}
    # recompute every term independently from the two models' outputs
    with torch.no_grad():
        s = student(batch["img"])
        t = teacher(batch["img"])
    w = LossWeights()
    assert w == LossWeights(kpt=1.0, vis_token=0.0005, kpt_token=0.0005, reg2hm=1.0, score=0.01)
    reg, sc = dk.simulated_heatmap_loss_reference(s["coords"], s["sigma"], s["score"], t["heatmaps"], batch["target_weight"])
    expect = {
        "loss_kpt": keypoint_regression_loss(s["coords"], batch["target_coords"], batch["target_weight"]),
        "loss_vis_token": 0.0005 * token_mse_loss(s["vis_tokens"], t["vis_tokens"]),
        "loss_kpt_token": 0.0005 * token_mse_loss(s["kpt_tokens"], t["kpt_tokens"]),
        "loss_reg2hm": reg,
        "loss_score": 0.01 * sc,
    }
    for k, v in expect.items():
        torch.testing.assert_close(losses[k].detach(), v, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses["loss"].detach(), sum(expect.values()), rtol=1e-4, atol=1e-7)
    losses["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "disable, gone",
    [
        ({"token"}, {"loss_vis_token", "loss_kpt_token"}),
        ({"reg2hm"}, {"loss_reg2hm"}),
        ({"score"}, {"loss_score"}),
        ({"token", "reg2hm", "score"}, {"loss_vis_token", "loss_kpt_token", "loss_reg2hm", "loss_score"}),
    ],
)
def test_switches(pair, disable, gone):
    student, teacher = pair
    losses = Distiller(student, teacher, disable=disable)(_batch(1))
    full = {"loss", "loss_kpt", "loss_vis_token", "loss_kpt_token", "loss_reg2hm", "loss_score"}
    assert set(losses) == full - gone


def test_bad_arguments(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="disable"):
        Distiller(student, teacher, disable={"tokens"})
    with pytest.raises(ValueError, match="student"):
        Distiller(teacher, student)
    with pytest.raises(ValueError, match="reg2hm_mode"):
        Distiller(student, teacher, reg2hm_mode="mean")


def _teacher_with_bn_stats(seed=0):
    torch.manual_seed(seed)
    teacher = build_model("tokenpose_tiny")
    g = torch.Generator().manual_seed(seed)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics: folding must matter
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    return teacher


def test_fold_teacher_bn_same_losses_caller_untouched(pair):
    student, _ = pair
    teacher = _teacher_with_bn_stats()
    batch = _batch()
    plain = Distiller(student, teacher)(batch)
    d = Distiller(student, teacher, fold_teacher_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.teacher.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())  # a copy was folded
    folded = d(batch)
    for k in plain:
        torch.testing.assert_close(folded[k], plain[k], rtol=1e-4, atol=1e-6)


def test_teacher_dtype_bf16(pair):
    student, _ = pair
    teacher = _teacher_with_bn_stats(1)
    batch = _batch()
    ref = Distiller(student, teacher)(batch)
    d = Distiller(student, teacher, teacher_dtype=torch.bfloat16, fold_teacher_bn=True)
    assert {p.dtype for p in d.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    d.float()  # casting the distiller does not undo the teacher's dtype
    assert {p.dtype for p in d.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    student.zero_grad(set_to_none=True)
    losses = d(batch)
    assert losses["loss"].dtype == torch.float32
    # the teacher's outputs carry bf16 rounding; every term stays within a few per cent
    for k in ref:
        torch.testing.assert_close(losses[k].detach(), ref[k], rtol=0.05, atol=1e-4)
    assert losses["loss_reg2hm"].item() != ref["loss_reg2hm"].item()  # the teacher really ran in bf16
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    with pytest.raises(ValueError, match="teacher_dtype"):
        Distiller(student, teacher, teacher_dtype=torch.int8)


def test_teacher_cuda_graph_falls_back_to_eager_off_cuda_and_copies_cleanly(pair):
    import copy

    student, _ = pair
    teacher = _teacher_with_bn_stats(2)
    batch = _batch()
    ref = Distiller(student, teacher)(batch)
    d = Distiller(student, teacher, teacher_cuda_graph=True)
    assert d.teacher is not teacher and teacher.check_finite and not d.teacher.check_finite
    got = d(batch)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert d._teacher_graphs == {}  # nothing captured for CPU inputs
    d._teacher_graphs[("sentinel",)] = ("not copyable",)
    e = copy.deepcopy(d)
    assert e._teacher_graphs == {} and d._teacher_graphs
    d.float()  # moving / casting drops captured graphs
    assert d._teacher_graphs == {}


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True])
def test_gpu_teacher_cuda_graph_matches_eager(pair, fast):
    student, _ = pair
    teacher = _teacher_with_bn_stats(3)
    kw = dict(fold_teacher_bn=True, teacher_dtype=torch.bfloat16, teacher_channels_last=True) if fast else {}
    s_ref, s_g = (build_model("distilpose_tiny").cuda() for _ in range(2))
    s_g.load_state_dict(s_ref.state_dict())
    eager = Distiller(s_ref, teacher, **kw).cuda()
    graphed = Distiller(s_g, teacher, teacher_cuda_graph=True, **kw).cuda()
    outs = []
    for seed in (0, 1, 0):  # replays see new data; a result stays valid after the next call
        batch = {k: v.cuda() for k, v in _batch(n=4, seed=seed).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = eager(batch), graphed(batch)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
        b["loss"].backward()
        outs.append(b["loss"].detach())
    assert len(graphed._teacher_graphs) == 1
    torch.testing.assert_close(outs[0], outs[2])
    assert outs[0].item() != outs[1].item()
