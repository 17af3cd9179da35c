"""COCO keypoint evaluation: prediction with flip test, decoding, OKS-NMS, rescoring, COCOeval, overlays."""
from .coco_eval import STAT_NAMES, coco_keypoint_eval, oks_iou, oks_nms, postprocess, rescore, write_results
from .decode import decode_heatmaps, flip_heatmaps, flip_regression
from .predict import crops_to_image, evaluate, predict, predict_crops
from .visualize import confidence_color, draw_pose

__all__ = [
    "predict", "evaluate", "predict_crops", "crops_to_image", "coco_keypoint_eval", "oks_iou", "oks_nms",
    "postprocess", "rescore", "write_results", "STAT_NAMES", "decode_heatmaps", "flip_heatmaps",
    "flip_regression", "draw_pose", "confidence_color",
]
