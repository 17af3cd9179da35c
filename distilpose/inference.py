"""Inference on images: Python API (:class:`PoseInferencer`) and ``distilpose infer``.

Example::

    from distilpose.inference import PoseInferencer
    inf = PoseInferencer(preset="distilpose_s", checkpoint="student.pth")   # or PoseInferencer(model)
    people = inf.predict("photo.jpg", boxes=[[x, y, w, h], ...])          # no boxes: the whole image
    people[0]   # (17, 3) array: x, y in image pixels, confidence

Images: a file path (EXIF orientation applied) or an array: (H, W) grayscale, (H, W, 3) RGB or
(H, W, 4) RGBA; uint8, uint16 or float (``channel_order="bgr"`` for OpenCV arrays). Any size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Union

import cv2
import numpy as np
import torch

from .data import transforms as T
from .data.coco import BadSampleError, read_image_rgb
from .fileio import atomic_write
from .evaluation.predict import crops_to_image, predict_crops
from .evaluation.visualize import draw_pose

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None`` -> cuda when available, else cpu; strings are checked."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {device!r} requested but CUDA is not available")
    return dev


def read_checkpoint_meta(checkpoint: str) -> Dict[str, Any]:
    """The "meta" dict stored in a checkpoint ({} when absent)."""
    from .checkpoint import read_checkpoint

    meta = read_checkpoint(checkpoint).get("meta")
    return dict(meta) if isinstance(meta, dict) else {}


def load_model(preset: Optional[str], checkpoint: Optional[str], device=None) -> torch.nn.Module:
    """Build ``preset`` (default: the checkpoint's meta["preset"]) and load ``checkpoint`` strictly; eval mode.

    The architecture the checkpoint's meta records (input size, e.g. the CPU demo's 128 x 96;
    number of keypoints; model overrides) is rebuilt; an explicit ``preset`` other than the
    recorded one takes only the input size from it.
    """
    from .checkpoint import build_model_from_meta, load_checkpoint

    meta = read_checkpoint_meta(checkpoint) if checkpoint is not None else {}
    if preset is None:
        if checkpoint is None:
            raise ValueError("load_model: give a preset, a checkpoint, or both")
        preset = meta.get("preset")
        if preset is None:
            raise ValueError(f"checkpoint {checkpoint!r} stores no meta['preset']; pass the preset name (--preset)")
    # another preset than the recorded one: only the recorded input size carries over
    model = build_model_from_meta(meta if meta.get("preset") == preset
                                  else {"preset": preset, "input_size": meta.get("input_size")})
    if checkpoint is not None:
        load_checkpoint(checkpoint, model, strict=True)
    else:
        logger.warning("no checkpoint given: %s has random weights", preset)
    return model.to(resolve_device(device)).eval()


def _as_boxes(boxes, width: int, height: int, box_format: str) -> np.ndarray:
    if boxes is None:
        return np.array([[0.0, 0.0, float(width), float(height)]])
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes: expected (M, 4) boxes, got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes: contain NaN or inf")
    if box_format == "xyxy":
        b = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    elif box_format != "xywh":
        raise ValueError(f"box_format: expected 'xywh' or 'xyxy', got {box_format!r}")
    if (b[:, 2] <= 0).any() or (b[:, 3] <= 0).any():
        raise ValueError(f"boxes: every box needs a positive width and height, got {b.tolist()}")
    return b


class PoseInferencer:
    """Top-down keypoints for person boxes in images.

    Args:
        model: a built model (``model.kind`` student or teacher); or give ``preset`` and/or
            ``checkpoint`` (preset read from the checkpoint when omitted).
        device: default cuda when available. flip_test: average with the mirrored crop.
        batch_size: boxes per forward pass. padding: box padding (1.25, as in training).
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        preset: Optional[str] = None,
        checkpoint: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        flip_test: bool = True,
        batch_size: int = 32,
        padding: float = 1.25,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not (math.isfinite(float(padding)) and float(padding) > 0):
            raise ValueError(f"padding: expected a positive finite factor, got {padding}")
        if model is None:
            model = load_model(preset, checkpoint, device)
        else:
            if checkpoint is not None:
                from .checkpoint import load_checkpoint

                load_checkpoint(checkpoint, model, strict=True)
            model = model.to(resolve_device(device) if device is not None else next(model.parameters()).device)
        self.model = model  # the caller's own: its train/eval mode is left as it is (eval inside predict)
        self.device = next(model.parameters()).device
        self.flip_test = flip_test
        self.batch_size = int(batch_size)
        self.padding = float(padding)
        self.input_size = tuple(getattr(model, "input_size", (256, 192)))

    def load_image(self, image: Union[str, os.PathLike, np.ndarray], channel_order: str = "rgb") -> np.ndarray:
        """Path or array -> (H, W, 3) uint8 RGB."""
        if isinstance(image, (str, os.PathLike)):
            return read_image_rgb(os.fspath(image), apply_exif=True)
        return T.to_rgb_uint8(image, channel_order)

    @torch.no_grad()
    def predict(
        self,
        image: Union[str, os.PathLike, np.ndarray],
        boxes: Optional[Sequence[Sequence[float]]] = None,
        box_format: str = "xywh",
        channel_order: str = "rgb",
    ) -> List[np.ndarray]:
        """Keypoints of each box: a list of (K, 3) float arrays (x, y in image px, confidence).

        ``boxes``: (M, 4) person boxes (``box_format`` "xywh", COCO's, or "xyxy"); None = the
        whole image as one box. An empty list gives an empty result.
        """
        rgb = self.load_image(image, channel_order)
        h, w = rgb.shape[:2]
        if boxes is not None and len(boxes) == 0:
            return []
        b = _as_boxes(boxes, w, h, box_format)
        aspect = self.input_size[1] / self.input_size[0]
        centers, scales, crops = [], [], []
        for box in b:
            c, s = T.box_to_center_scale(box, aspect, self.padding)
            m = T.get_affine_matrix(c, s, 0.0, self.input_size)
            crops.append(T.normalize_image(T.warp_crop(rgb, m, self.input_size)))
            centers.append(c)
            scales.append(s)
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(crops), self.batch_size):
                img = torch.from_numpy(np.stack(crops[i : i + self.batch_size])).to(self.device)
                coords, scores = predict_crops(self.model, img, self.flip_test)
                xy = crops_to_image(coords.cpu().double().numpy(), np.stack(centers[i : i + self.batch_size]),
                                    np.stack(scales[i : i + self.batch_size]))
                s = scores.cpu().double().numpy()
                out.extend(np.concatenate([xy[j], s[j][:, None]], axis=1) for j in range(xy.shape[0]))
        finally:
            self.model.train(was_training)
        return out

    __call__ = predict


# ----------------------------------------------------------------------------- CLI: distilpose infer


def list_images(inputs: Sequence[str], recursive: bool = False) -> List[str]:
    """Files and folders -> image files (folders: files with an image extension, sorted)."""
    out = []
    for p in inputs:
        if os.path.isdir(p):
            walk = os.walk(p) if recursive else [(p, [], sorted(os.listdir(p)))]
            for root, _, files in walk:
                out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"input: no such file or folder: {p}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--preset", default=None, help="model preset (default: the checkpoint's)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file")
    parser.add_argument("--out", required=True, help="output folder: <name>.json and <name>_pose.png per image")
    parser.add_argument("--boxes", default=None,
                        help="JSON {image file name or path: [[x, y, w, h], ...]}; default: the whole image as one box")
    parser.add_argument("--kpt-thr", type=float, default=0.3, help="confidence below which keypoints are drawn hollow")
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--device", default=None)
    parser.add_argument("--recursive", action="store_true", help="search folders recursively")


def run(args: argparse.Namespace) -> int:
    images = list_images(args.inputs, args.recursive)
    if not images:
        print("distilpose infer: no images found", file=sys.stderr)
        return 1
    box_map: Dict[str, Any] = {}
    if args.boxes:
        with open(args.boxes) as f:
            box_map = json.load(f)
        if not isinstance(box_map, dict):
            raise SystemExit("--boxes: expected a JSON object {image: [[x, y, w, h], ...]}")
    inf = PoseInferencer(preset=args.preset, checkpoint=args.checkpoint, device=args.device, flip_test=not args.no_flip)
    os.makedirs(args.out, exist_ok=True)
    failures, summary = 0, []
    stems: Dict[str, int] = {}
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        n = stems.get(stem, 0)
        stems[stem] = n + 1
        if n:
            stem = f"{stem}_{n}"
        try:
            rgb = read_image_rgb(path, apply_exif=True)
        except BadSampleError as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            failures += 1
            continue
        boxes = box_map.get(path, box_map.get(os.path.basename(path)))
        b = _as_boxes(boxes, rgb.shape[1], rgb.shape[0], "xywh") if boxes is None or len(boxes) else np.zeros((0, 4))
        people = inf.predict(rgb, b) if len(b) else []
        overlay = np.ascontiguousarray(rgb[..., ::-1])
        for box, kp in zip(b, people):
            overlay = draw_pose(overlay, kp, kpt_thr=args.kpt_thr, bbox=box if boxes is not None else None)
        rec = dict(
            image=os.path.abspath(path), width=int(rgb.shape[1]), height=int(rgb.shape[0]), model=inf.model.name,
            keypoint_names=list(T.COCO_KEYPOINTS),
            people=[dict(bbox=[float(v) for v in box], keypoints=[[round(float(v), 3) for v in row] for row in kp],
                         score=float(kp[:, 2].mean())) for box, kp in zip(b, people)],
        )
        atomic_write(os.path.join(args.out, f"{stem}.json"), json.dumps(rec, indent=1).encode())
        ok, png = cv2.imencode(".png", overlay)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {path}")
        atomic_write(os.path.join(args.out, f"{stem}_pose.png"), png.tobytes())
        summary.append(rec)
        print(f"{path}: {len(people)} person(s) -> {os.path.join(args.out, stem + '_pose.png')}")
    atomic_write(os.path.join(args.out, "predictions.json"), json.dumps(summary).encode())
    return 1 if failures else 0
