"""COCO top-down data: dataset, transforms, targets, loaders and the embedded demo dataset."""
from .coco import BadSampleError, TopDownCocoDataset, load_coco, read_image_rgb
from .demo import default_demo_root, ensure_demo_dataset, generate_demo_dataset
from .loader import build_dataloader, set_epoch
from .targets import student_targets, teacher_targets
from .transforms import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    COCO_SIGMAS,
    COCO_SKELETON,
    box_to_center_scale,
    flip_permutation,
)

__all__ = [
    "TopDownCocoDataset", "BadSampleError", "load_coco", "read_image_rgb", "build_dataloader", "set_epoch",
    "generate_demo_dataset", "ensure_demo_dataset", "default_demo_root", "student_targets", "teacher_targets",
    "COCO_FLIP_PAIRS", "COCO_KEYPOINTS", "COCO_SIGMAS", "COCO_SKELETON",
    "box_to_center_scale", "flip_permutation",
]
