"""`distilpose demo` end to end at a tiny size: data -> teacher -> student -> COCOeval -> table, plots."""
from __future__ import annotations

import json
import os

import cv2

from distilpose.cli import main
from distilpose.demo import choose_out_dir, format_table
from distilpose.checkpoint import model_from_checkpoint


def test_demo_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILPOSE_DEMO_DATA", str(tmp_path / "data"))
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress", "--num-overlays", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher" in printed and "| student" in printed and "AP50" in printed

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["role"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["teacher"]["preset"] == "tokenpose_tiny" and rows["student"]["preset"] == "distilpose_tiny"
    for r in rows.values():
        assert 0.0 <= r["AP"] <= 1.0 and 0.0 <= r["AP50"] <= 1.0
        assert r["params"] > 10_000 and r["gmacs"] > 0 and r["img_s"] > 0
    assert rows["student"]["params"] < rows["teacher"]["params"]
    assert (out / "table.md").read_text().strip() == format_table(summary["rows"])

    curves = cv2.imread(str(out / "loss_curves.png"))
    assert curves is not None and curves.shape[0] > 100
    overlays = sorted((out / "overlays").glob("*.jpg"))
    assert len(overlays) == 2 and cv2.imread(str(overlays[0])) is not None

    for role in ("teacher", "student"):
        assert (out / role / "config.yaml").is_file()
        recs = [json.loads(l) for l in open(out / role / "metrics.jsonl")]
        assert any(r["type"] == "train" and "loss" in r for r in recs)
        m = model_from_checkpoint(str(out / role / "last.pth"))
        assert m.kind == role and m.input_size == (64, 48)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]  # atomic writes left nothing behind

    # a finished run is never overwritten: a rerun goes to a new folder unless --force
    new, note = choose_out_dir(str(out), force=False)
    assert new != str(out) and new.startswith(str(out) + "-") and "finished" in note
    same, _ = choose_out_dir(str(out), force=True)
    assert same == str(out) and not (out / "summary.json").exists()


def test_ablate_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILPOSE_DEMO_DATA", str(tmp_path / "data"))
    out = tmp_path / "ablate"
    args = ["ablate", "--config", "tiny_student", "--teacher-config", "tiny_teacher", "--out", str(out),
            "--variants", "full,no_reg2hm,none", "--epochs", "1", "--teacher-epochs", "1", "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| full" in table and "| no_reg2hm" in table and "| none" in table
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())}
    assert set(rows) == {"full", "no_reg2hm", "none"}
    for r in rows.values():
        assert 0.0 <= r["metrics"]["AP"] <= 1.0
    # the parts really were switched off: the logged loss terms differ per variant
    terms = {}
    for v in rows:
        recs = [json.loads(l) for l in open(out / v / "metrics.jsonl") if '"train"' in l]
        terms[v] = {k for k in recs[0] if k.startswith("loss_")}
    assert terms["full"] == {"loss_kpt", "loss_vis_token", "loss_kpt_token", "loss_reg2hm", "loss_score"}
    assert terms["no_reg2hm"] == terms["full"] - {"loss_reg2hm"}
    assert terms["none"] == {"loss_kpt"}
    # a rerun reuses the finished variants
    assert main(args) == 0
    assert "[teacher]" not in capsys.readouterr().out
