"""COCO keypoint evaluation: OKS, OKS-NMS, rescoring and the pycocotools COCOeval wrapper."""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.transforms import COCO_SIGMAS
from ..fileio import atomic_write

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def oks_iou(g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas: np.ndarray = COCO_SIGMAS,
            vis_thr: Optional[float] = None) -> np.ndarray:
    """OKS between one instance g (K, 3) and instances d (M, K, 3) (mmpose's oks_iou, for NMS)."""
    vars_ = (2 * np.asarray(sigmas)) ** 2
    dx = d[..., 0] - g[None, :, 0]
    dy = d[..., 1] - g[None, :, 1]
    e = (dx**2 + dy**2) / vars_[None] / ((area_g + np.asarray(area_d)[:, None]) / 2 + np.spacing(1)) / 2
    if vis_thr is not None:
        ind = (g[None, :, 2] > vis_thr) & (d[..., 2] > vis_thr)
        return np.array([np.exp(-ei[m]).sum() / max(m.sum(), 1) if m.any() else 0.0 for ei, m in zip(e, ind)])
    return np.exp(-e).mean(axis=1)


def oks_nms(instances: Sequence[Dict[str, Any]], thr: float = 0.9, sigmas: np.ndarray = COCO_SIGMAS,
            vis_thr: Optional[float] = None) -> List[int]:
    """Greedy OKS-NMS over instances of one image (dicts with keypoints (K,3), score, area). -> kept indices."""
    if len(instances) == 0:
        return []
    scores = np.array([float(i["score"]) for i in instances])
    kpts = np.stack([np.asarray(i["keypoints"], dtype=np.float64).reshape(-1, 3) for i in instances])
    areas = np.array([float(i["area"]) for i in instances])
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
        order = order[1:][ovr <= thr]
    return keep


def rescore(keypoints: np.ndarray, box_score: float, vis_thr: float = 0.2) -> float:
    """Instance score = box score x mean of the keypoint scores above ``vis_thr`` (0 when none)."""
    s = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)[:, 2]
    m = s > vis_thr
    return float(box_score * (s[m].mean() if m.any() else 0.0))


def postprocess(raw: Sequence[Dict[str, Any]], oks_thr: float = 0.9, vis_thr: float = 0.2,
                sigmas: np.ndarray = COCO_SIGMAS) -> List[Dict[str, Any]]:
    """Raw per-box predictions (image_id, keypoints (K,3), box_score, area) -> COCO results.

    Rescoring (box score x mean keypoint score above ``vis_thr``), then OKS-NMS per image at
    ``oks_thr`` (mmpose's protocol). Output dicts: image_id, category_id=1, keypoints [x,y,s]*K, score.
    """
    by_image = defaultdict(list)
    for r in raw:
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3)
        by_image[int(r["image_id"])].append(
            dict(keypoints=kp, score=rescore(kp, float(r.get("box_score", 1.0)), vis_thr), area=float(r["area"]))
        )
    out = []
    for img_id in sorted(by_image):
        inst = by_image[img_id]
        keep = oks_nms(inst, oks_thr, sigmas) if oks_thr is not None and oks_thr < 1.0 + 1e-9 else range(len(inst))
        for i in keep:
            out.append(dict(image_id=img_id, category_id=1,
                            keypoints=[round(float(v), 3) for v in inst[i]["keypoints"].reshape(-1)],
                            score=float(inst[i]["score"])))
    return out


def coco_keypoint_eval(gt: Union[str, Any], results: Union[str, List[Dict[str, Any]]],
                       sigmas: Optional[np.ndarray] = None, verbose: bool = False) -> Dict[str, float]:
    """COCO keypoint AP/AR of ``results`` (list or JSON path) against ``gt`` (JSON path or COCO object).

    Returns the ten COCOeval stats by name (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl).
    With no result at all every stat is 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO(gt) if isinstance(gt, str) else gt
        if isinstance(results, str):
            with open(results) as f:
                results = json.load(f)
        if len(results) == 0:
            return {k: 0.0 for k in STAT_NAMES}
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes mutates its input
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}


def write_results(path: str, results: List[Dict[str, Any]]) -> None:
    """Write COCO results JSON atomically."""
    atomic_write(path, json.dumps(results))
