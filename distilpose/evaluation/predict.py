"""Prediction over a top-down loader and COCO evaluation, for students and teachers."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import COCO_FLIP_PAIRS
from .coco_eval import coco_keypoint_eval, postprocess, write_results
from .decode import decode_heatmaps, flip_heatmaps, flip_regression, swap_pairs

logger = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_crops(
    model: torch.nn.Module,
    img: torch.Tensor,
    flip_test: bool = True,
    flip_pairs: Sequence[Tuple[int, int]] = COCO_FLIP_PAIRS,
    dark_kernel: int = 11,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keypoints of normalised crops (N, 3, H, W) -> (coords (N, K, 2) normalised to the crop, scores (N, K)).

    Student: the regression output (score channel as confidence); flip test averages with the
    mirrored crop (x' = 1 - x, left/right swapped). Teacher: heatmaps (flip test: mirrored,
    swapped and shifted by one pixel, then averaged), decoded with DARK.
    """
    kind = getattr(model, "kind", None)
    if kind not in ("student", "teacher"):
        raise ValueError(f"model.kind: expected 'student' or 'teacher', got {kind!r}")
    out = model(img)
    if kind == "student":
        coords, score = out["coords"].float(), out["score"].float()[..., 0]
        if flip_test:
            of = model(img.flip(3))
            coords = (coords + flip_regression(of["coords"].float(), flip_pairs)) * 0.5
            score = (score + swap_pairs(of["score"].float(), flip_pairs)[..., 0]) * 0.5
        return coords, score
    hm = out["heatmaps"].float()
    if flip_test:
        hm = (hm + flip_heatmaps(model(img.flip(3))["heatmaps"].float(), flip_pairs, shift=True)) * 0.5
    xy, maxvals = decode_heatmaps(hm, method="dark", kernel=dark_kernel)
    h, w = hm.shape[-2:]
    return xy.float() / torch.tensor([w, h], dtype=torch.float32, device=xy.device), maxvals.float()


def crops_to_image(coords: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Normalised crop coordinates (N, K, 2) -> image pixels for unrotated crops (mmpose transform_preds)."""
    return (coords - 0.5) * scale[:, None, :] + center[:, None, :]


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    flip_test: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    postprocess_results: bool = True,
    oks_thr: float = 0.9,
    vis_thr: float = 0.2,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """COCO-format keypoint results of ``model`` on every box of ``loader``.

    With ``postprocess_results`` (default): rescoring and OKS-NMS (see ``coco_eval.postprocess``);
    dicts (image_id, category_id=1, keypoints [x, y, s]*K in image px, score). Without: one raw
    dict per box with keypoints (K, 3), box_score, area, index. Under torch.distributed the
    predictions of every rank are gathered (each rank gets all of them).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    raw: List[Dict[str, Any]] = []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="predict", unit="batch")
    try:
        for batch in it:
            meta = batch["meta"]
            if bool(meta["flipped"].any()) or bool((meta["rotation"] != 0).any()):
                raise ValueError("predict: the loader's dataset augments its crops; evaluate with aug=None / train=False")
            img = batch["img"].to(device, non_blocking=True)
            coords, scores = predict_crops(model, img, flip_test)
            xy = crops_to_image(coords.cpu().double().numpy(), meta["center"].numpy(), meta["scale"].numpy())
            s = scores.cpu().double().numpy()
            for i in range(xy.shape[0]):
                raw.append(dict(
                    image_id=int(meta["image_id"][i]), keypoints=np.concatenate([xy[i], s[i][:, None]], axis=1),
                    box_score=float(meta["bbox_score"][i]), area=float(meta["area"][i]), index=int(meta["index"][i]),
                ))
    finally:
        model.train(was_training)
    raw = _gather(raw)
    if not postprocess_results:
        return raw
    return postprocess(raw, oks_thr=oks_thr, vis_thr=vis_thr)


def _gather(raw: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return raw
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, raw)
    seen, out = set(), []
    for part in parts:
        for r in part:  # DistributedSampler pads with repeated samples
            if r["index"] not in seen:
                seen.add(r["index"])
                out.append(r)
    return sorted(out, key=lambda r: r["index"])


def evaluate(
    model: torch.nn.Module,
    dataset_or_loader: Union[Dataset, DataLoader],
    flip_test: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    results_file: Optional[str] = None,
    oks_thr: float = 0.9,
    vis_thr: float = 0.2,
    progress: bool = False,
) -> Dict[str, float]:
    """COCO keypoint AP/AR (pycocotools COCOeval) of ``model`` on a TopDownCocoDataset or its loader.

    Returns {"AP", "AP50", "AP75", "APm", "APl", "AR", ...} (floats; COCOeval gives -1 for an
    area range without ground truth). ``results_file``: also write the COCO results JSON.
    """
    if isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
        dataset = loader.dataset
    else:
        from ..data.loader import build_dataloader

        dataset = dataset_or_loader
        loader = build_dataloader(dataset, batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    coco = getattr(dataset, "coco", None)
    if coco is None:
        raise ValueError("evaluate: the dataset needs a pycocotools COCO ground truth in `.coco` (TopDownCocoDataset)")
    results = predict(model, loader, flip_test=flip_test, device=device, oks_thr=oks_thr, vis_thr=vis_thr, progress=progress)
    if results_file:
        write_results(results_file, results)
    return coco_keypoint_eval(coco, results)
