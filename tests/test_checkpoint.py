"""Checkpoints: atomic saves, strict loads, and the original release's key layout.

The original TokenPose/DistilPose token head is re-implemented here in its own module
structure (Residual(PreNorm(...)), einsum attention, rearrange-style patching written as
loops) so that converting its state dict into our model must reproduce its outputs.
"""
import os

import pytest
import torch
from torch import nn

from distilpose.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_original_checkpoint,
    save_checkpoint,
    save_original_checkpoint,
    to_original_state_dict,
)
from distilpose.models import build_model


class _Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class _PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class _FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class _Transformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim, num_keypoints):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.layers = nn.ModuleList(
            nn.ModuleList([_Residual(_PreNorm(dim, _Attention(dim, heads))), _Residual(_PreNorm(dim, _FeedForward(dim, mlp_dim)))])
            for _ in range(depth)
        )

    def forward(self, x, pos):
        for idx, (attn, ff) in enumerate(self.layers):
            if idx > 0:
                x[:, self.num_keypoints :] += pos
            x = ff(attn(x))
        return x


class _OriginalTokenHead(nn.Module):
    """The release's `tokenhead` layout (keypoint_token, pos_embedding, patch_to_embedding, transformer, mlp_head)."""

    def __init__(self, ours):
        super().__init__()
        tde = ours.tde
        dim, k = tde.dim, tde.num_keypoints
        self.k, self.c = k, tde.in_channels
        self.keypoint_token = nn.Parameter(torch.randn(1, k, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tde.num_patches, dim), requires_grad=False)
        self.patch_to_embedding = nn.Linear(12 * tde.in_channels, dim)
        layer = tde.layers[0]
        self.transformer = _Transformer(dim, len(tde.layers), layer.attn.num_heads, layer.mlp.fc1.out_features, k)
        if ours.kind == "student":
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 5))
        else:
            hid = ours.head.fc1.out_features
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hid), nn.LayerNorm(hid), nn.Linear(hid, 64 * 48))

    def forward(self, feat):
        n = feat.shape[0]
        patches = []
        for pr in range(16):  # b c (h p1) (w p2) -> b (h w) (p1 p2 c), written as loops
            for pc in range(16):
                vec = [feat[:, :, pr * 4 + r, pc * 3 + q] for r in range(4) for q in range(3)]
                patches.append(torch.cat(vec, dim=1))
        x = self.patch_to_embedding(torch.stack(patches, 1)) + self.pos_embedding
        x = torch.cat((self.keypoint_token.expand(n, -1, -1), x), 1)
        x = self.transformer(x, self.pos_embedding)
        return self.mlp_head(x[:, : self.k])




def _original_from(ours):
    import copy

    orig = nn.Module()
    orig.backbone = copy.deepcopy(ours.backbone)
    for p in orig.backbone.parameters():
        nn.init.normal_(p, std=0.1)
    orig.keypoint_head = nn.Module()
    orig.keypoint_head.tokenhead = _OriginalTokenHead(ours)
    for p in orig.keypoint_head.tokenhead.parameters():
        with torch.no_grad():
            p.normal_(std=0.2)
    return orig


@pytest.mark.parametrize("preset", ["distilpose_tiny", "tokenpose_tiny"])
def test_original_checkpoint_reproduces_original_outputs(tmp_path, preset):
    torch.manual_seed(0)
    ours = build_model(preset).eval()
    orig = _original_from(ours).eval()
    path = tmp_path / "release.pth"
    torch.save({"state_dict": orig.state_dict(), "meta": {"epoch": 300}}, path)
    ckpt = load_original_checkpoint(str(path), ours)
    assert ckpt["load_report"] == {"missing": [], "unexpected": [], "shape_mismatch": []}
    img = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        raw = orig.keypoint_head.tokenhead(orig.backbone(img))
        out = ours(img)
    if preset.startswith("distilpose"):
        torch.testing.assert_close(out["coords"], raw[..., 0:2].sigmoid(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["score"], raw[..., 2:3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["sigma"], torch.nn.functional.softplus(raw[..., 3:5]), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out["heatmaps"], raw.reshape(2, 17, 64, 48), rtol=1e-5, atol=1e-5)
    # saving back to the release layout gives the original keys and values
    back = tmp_path / "back.pth"
    save_original_checkpoint(str(back), ours)
    sd = torch.load(back)["state_dict"]
    assert set(sd) == set(orig.state_dict())
    for k, v in orig.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_release_key_names():
    keys = set(to_original_state_dict(build_model("distilpose_s").state_dict(), "student"))
    for k in [
        "keypoint_head.tokenhead.keypoint_token",
        "keypoint_head.tokenhead.pos_embedding",
        "keypoint_head.tokenhead.patch_to_embedding.weight",
        "keypoint_head.tokenhead.transformer.layers.11.0.fn.norm.bias",
        "keypoint_head.tokenhead.transformer.layers.0.0.fn.fn.to_qkv.weight",
        "keypoint_head.tokenhead.transformer.layers.3.0.fn.fn.to_out.0.weight",
        "keypoint_head.tokenhead.transformer.layers.3.1.fn.fn.net.3.bias",
        "keypoint_head.tokenhead.mlp_head.1.weight",
        "backbone.layer1.0.downsample.1.running_var",
        "backbone.conv2.weight",
    ]:
        assert k in keys, k
    t = set(to_original_state_dict(build_model("tokenpose_teacher").state_dict(), "teacher"))
    assert "keypoint_head.tokenhead.mlp_head.3.weight" in t
    assert "backbone.transition3.3.0.0.weight" in t and "backbone.stage4.2.fuse_layers.0.3.0.weight" in t


def test_partial_original_load_refused_with_key_report(tmp_path):
    ours = build_model("distilpose_tiny")
    sd = to_original_state_dict(ours.state_dict(), "student")
    sd.pop("keypoint_head.tokenhead.mlp_head.1.weight")
    sd["keypoint_head.tokenhead.extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_original_checkpoint(str(path), ours)
    msg = str(e.value)
    assert "head.fc.weight" in msg and "keypoint_head.tokenhead.extra.weight" in msg
    report = load_original_checkpoint(str(path), ours, strict=False)["load_report"]
    assert report["missing"] == ["head.fc.weight"]
    assert report["unexpected"] == ["keypoint_head.tokenhead.extra.weight"]


def test_our_checkpoint_round_trip_and_atomic(tmp_path):
    a = build_model("distilpose_tiny")
    path = tmp_path / "sub" / "model.pth"
    save_checkpoint(str(path), a, epoch=3)
    assert os.listdir(path.parent) == ["model.pth"]  # no temp file left behind
    b = build_model("distilpose_tiny")
    ckpt = load_checkpoint(str(path), b)
    assert ckpt["meta"]["preset"] == "distilpose_tiny" and ckpt["epoch"] == 3
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(CheckpointMismatchError, match="shape_mismatch"):
        load_checkpoint(str(path), build_model("distilpose_demo"))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pth"), b)


def test_failed_save_keeps_previous_file(tmp_path):
    a = build_model("distilpose_tiny")
    path = tmp_path / "model.pth"
    save_checkpoint(str(path), a)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(str(path), a, bad=lambda: None)  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pth"]


def test_atomic_writes_never_replace_a_special_file(tmp_path):
    """``--out /dev/null``-style targets: the content goes through, the node stays what it is
    (a rename would turn it into a regular file). A FIFO stands in for /dev/null here."""
    import stat
    import threading

    from distilpose.fileio import atomic_write, replace_into, staging_dir, staging_path

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    atomic_write(str(fifo), "hello")
    reader.join(timeout=10)
    assert got == ["hello"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert staging_dir(str(fifo)) != str(tmp_path) and not staging_path(str(fifo)).startswith(str(fifo))
    # regular targets: same folder, renamed into place
    reg = tmp_path / "out.json"
    assert staging_dir(str(reg)) == str(tmp_path) and staging_path(str(reg)) == str(reg) + ".tmp"
    tmp = staging_path(str(reg))
    with open(tmp, "w") as f:
        f.write("x")
    replace_into(tmp, str(reg))
    assert reg.read_text() == "x" and not os.path.exists(tmp)
