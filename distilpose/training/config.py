"""Training configuration: nested dataclasses, named presets, overrides, and (de)serialisation.

A config starts from a named preset (``PRESETS``), is updated from an optional config file
(YAML/JSON dict, or a Python file defining ``config`` as a dict or a ``TrainConfig``) and then
from ``--set a.b=value`` overrides (values parsed as YAML: ``--set optim.milestones=[10,20]``).
The resolved config is written with every run (``config.yaml``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import runpy
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..fileio import atomic_write
from ..models.distiller import LossWeights


@dataclass
class ModelConfig:
    preset: str = "distilpose_s"
    input_size: Tuple[int, int] = (256, 192)  # (H, W) of the crop; heatmaps are 1/4 of it
    num_keypoints: int = 17
    attention_backend: Optional[str] = None  # None/auto, "reference", "triton"
    overrides: Dict[str, Any] = field(default_factory=dict)  # passed to build_model(**overrides)


@dataclass
class TeacherConfig:
    preset: Optional[str] = "tokenpose_teacher"  # None: no teacher (plain regression baseline)
    checkpoint: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    # frozen-teacher speed-ups (Distiller): fold its conv+BN pairs (and then fuse each conv's
    # bias, residual add and ReLU into the conv unless fuse_epilogues is false); store and run
    # it in "bf16"/"fp16" without autocast (None: as loaded, under the run's autocast); keep
    # its conv weights channels-last; replay its forward as a CUDA graph (one per batch shape)
    fold_bn: bool = False
    dtype: Optional[str] = None
    fuse_epilogues: bool = True
    channels_last: bool = False
    cuda_graph: bool = False


@dataclass
class LossConfig(LossWeights):
    """Student loss weights (defaults as released, from LossWeights) and switches; see distilpose.models.distiller."""

    disable: List[str] = field(default_factory=list)  # subset of "token", "reg2hm", "score"
    reg2hm_mode: str = "released"  # or "per_sample"
    backend: Optional[str] = None  # loss-kernel backend: None/auto, "reference", "triton"


@dataclass
class DataConfig:
    kind: str = "coco"  # "coco" (a COCO root), "demo" (the embedded procedural set), "synthetic" (tests)
    root: Optional[str] = None  # COCO root, or the demo root (None: distilpose.data.demo.default_demo_root())
    train_ann: str = "annotations/person_keypoints_train2017.json"
    train_img: str = "train2017"
    val_ann: str = "annotations/person_keypoints_val2017.json"
    val_img: str = "val2017"
    det_file: Optional[str] = None  # person boxes for val (None: ground-truth boxes)
    det_score_thr: float = 0.0
    aug: Optional[str] = None  # "student" / "teacher" / "none" (no augmentation) / None: from the training mode
    heatmap_encoding: str = "unbiased"
    heatmap_sigma: Optional[float] = None  # teacher target sigma in heatmap px; None: 2 x (heatmap H / 64)
    # teacher training targets: "device" (one gaussian_heatmap_targets call per batch on the
    # training device; the workers send keypoints) or "worker" (per sample in the data workers)
    heatmap_targets: str = "device"
    batch_size: int = 32  # per process
    val_batch_size: int = 64
    num_workers: int = 4
    demo_num_train: int = 1000
    demo_num_val: int = 200
    demo_seed: int = 0
    bad_sample: str = "raise"


@dataclass
class OptimConfig:
    """The released recipe: Adam 1e-3, linear warm-up 500 iters from 0.001x, x0.1 at 200/260, 300 epochs."""

    name: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    epochs: int = 300
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    milestones: List[int] = field(default_factory=lambda: [200, 260])
    gamma: float = 0.1
    grad_clip: Optional[float] = None  # max global grad norm; None: off


@dataclass
class TrainConfig:
    name: str = "custom"
    mode: str = "distill"  # "teacher" or "distill"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    work_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    amp: str = "none"  # "none", "auto", "bf16", "fp16"
    channels_last: bool = False
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    find_unused_parameters: bool = False
    eval_interval: int = 10  # epochs; 0: never (except a final evaluation when final_eval)
    final_eval: bool = True
    flip_test: bool = True
    ckpt_interval_steps: int = 0  # also save last.pth every N steps (mid-epoch resume points); 0: epoch ends
    log_interval: int = 20  # steps between metrics.jsonl train lines
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many global steps
    max_time_s: Optional[float] = None  # stop (with a checkpoint) once training has run this long (a budget guard)
    progress: bool = True  # tqdm bars on rank 0
    tensorboard: bool = False  # needs the tensorboard package

    def to_dict(self) -> Dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "")


# ----------------------------------------------------------------------------- presets


def _paper_student(preset: str) -> TrainConfig:
    return TrainConfig(
        name=f"{preset}_coco",
        mode="distill",
        model=ModelConfig(preset=preset),
        teacher=TeacherConfig(preset="tokenpose_teacher"),
        data=DataConfig(kind="coco", batch_size=32),
        amp="auto",
        ckpt_interval_steps=1000,
        work_dir=f"runs/{preset}_coco",
    )


def _demo_data(n_train: int, n_val: int, batch: int, workers: int, aug: Optional[str] = None) -> DataConfig:
    return DataConfig(
        kind="demo", demo_num_train=n_train, demo_num_val=n_val, batch_size=batch, val_batch_size=64,
        num_workers=workers, aug=aug,
    )


def _small_recipe(epochs: int, warmup: int, lr: float = 2e-3) -> OptimConfig:
    m = [max(1, int(epochs * 0.85))]
    return OptimConfig(lr=lr, epochs=epochs, warmup_iters=warmup, milestones=m)


# The CPU demo crops are 64 x 48 (heatmaps 16 x 12, 4 x 4 visual tokens): 16x fewer pixels than the
# paper's 256 x 192, without augmentation, batch 16, lr 2e-3: what lets a teacher and a student
# get past the mean pose on 2 cores within the demo's 5 minutes (each stage has a time guard).
DEMO_INPUT = (64, 48)
TINY_INPUT = (64, 48)

PRESETS: Dict[str, TrainConfig] = {
    # The paper's runs (COCO train2017 / val2017, 8 GPUs: batch is per process).
    "tokenpose_teacher_coco": TrainConfig(
        name="tokenpose_teacher_coco",
        mode="teacher",
        model=ModelConfig(preset="tokenpose_teacher"),
        teacher=TeacherConfig(preset=None),
        data=DataConfig(kind="coco", batch_size=64),
        amp="auto",
        ckpt_interval_steps=1000,
        work_dir="runs/tokenpose_teacher_coco",
    ),
    "distilpose_s_coco": _paper_student("distilpose_s"),
    "distilpose_l_coco": _paper_student("distilpose_l"),
    # The CPU demo (embedded procedural data).
    "demo_teacher": TrainConfig(
        name="demo_teacher",
        mode="teacher",
        model=ModelConfig(preset="tokenpose_tiny", input_size=DEMO_INPUT),
        teacher=TeacherConfig(preset=None),
        data=_demo_data(600, 100, 16, 1, aug="none"),
        optim=_small_recipe(25, 50),
        eval_interval=0,
        log_interval=10,
        max_time_s=140.0,
        work_dir="runs/demo/teacher",
    ),
    "demo_student": TrainConfig(
        name="demo_student",
        mode="distill",
        model=ModelConfig(preset="distilpose_tiny", input_size=DEMO_INPUT),
        teacher=TeacherConfig(preset="tokenpose_tiny"),
        data=_demo_data(600, 100, 16, 1, aug="none"),
        optim=_small_recipe(25, 50),
        eval_interval=0,
        log_interval=10,
        max_time_s=140.0,
        work_dir="runs/demo/student",
    ),
    # Tests / CI smoke size.
    "tiny_teacher": TrainConfig(
        name="tiny_teacher",
        mode="teacher",
        model=ModelConfig(preset="tokenpose_tiny", input_size=TINY_INPUT),
        teacher=TeacherConfig(preset=None),
        data=_demo_data(64, 16, 16, 0),
        optim=_small_recipe(2, 2),
        eval_interval=0,
        flip_test=False,
        log_interval=1,
        progress=False,
        work_dir="runs/tiny/teacher",
    ),
    "tiny_student": TrainConfig(
        name="tiny_student",
        mode="distill",
        model=ModelConfig(preset="distilpose_tiny", input_size=TINY_INPUT),
        teacher=TeacherConfig(preset="tokenpose_tiny"),
        data=_demo_data(64, 16, 16, 0),
        optim=_small_recipe(2, 2),
        eval_interval=0,
        flip_test=False,
        log_interval=1,
        progress=False,
        work_dir="runs/tiny/student",
    ),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"config preset: unknown {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# ----------------------------------------------------------------------------- overrides and files


def parse_override(item: str) -> Tuple[str, Any]:
    """'optim.lr=5e-4' -> ('optim.lr', 0.0005); the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"--set: expected KEY=VALUE (e.g. optim.lr=5e-4), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set: empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Set dotted keys ('optim.lr') in a copy of ``cfg``; unknown keys raise with the valid choices."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        node = d
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                here = ".".join(parts[: i + 1])
                choices = sorted(k for k, v in node.items() if isinstance(v, dict)) if isinstance(node, dict) else []
                raise KeyError(f"config key {key!r}: {here!r} is not a section; sections: {choices}")
            node = node[p]
        last = parts[-1]
        if last not in node and not _is_free_dict(cfg, parts[:-1]):
            raise KeyError(f"config key {key!r}: unknown field {last!r}; fields here: {sorted(node)}")
        node[last] = value
    return TrainConfig.from_dict(d)


def _is_free_dict(cfg: TrainConfig, parts: Sequence[str]) -> bool:
    """True inside a Dict[str, Any] field (e.g. model.overrides.tde), where any key is allowed."""
    obj: Any = cfg
    for p in parts:
        if dataclasses.is_dataclass(obj):
            obj = getattr(obj, p, None)
        elif isinstance(obj, dict):
            return True
        else:
            return False
    return isinstance(obj, dict)


def merge_dict(cfg: TrainConfig, d: Mapping[str, Any]) -> TrainConfig:
    """Merge a nested (partial) dict over ``cfg``."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any], target: Any) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            sub = getattr(target, k, None) if dataclasses.is_dataclass(target) else None
            if isinstance(v, Mapping) and dataclasses.is_dataclass(sub):
                walk(key + ".", v, sub)
            else:
                flat[key] = v

    walk("", d, cfg)
    return apply_overrides(cfg, flat)


def load_config_file(path: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """Read a YAML/JSON/Python config file -> (base preset name or None, nested dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file: no file at {path!r}")
    if path.endswith(".py"):
        ns = runpy.run_path(path)
        if "config" not in ns:
            raise ValueError(f"config file {path!r}: a Python config must define `config` (dict or TrainConfig)")
        obj = ns["config"]
        d = obj.to_dict() if isinstance(obj, TrainConfig) else dict(obj)
        base = ns.get("base")
    else:
        with open(path) as f:
            d = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"config file {path!r}: expected a mapping at the top level, got {type(d).__name__}")
        base = None
    d = dict(d)
    base = d.pop("base", base)
    return base, d


def resolve_config(
    base: Optional[str] = None, config_file: Optional[str] = None, overrides: Sequence[str] = (), default: str = "distilpose_s_coco"
) -> TrainConfig:
    """preset (``base``, or the file's ``base:``, or ``default``) <- config file <- ``--set`` overrides.

    ``base`` may also be a path to a config file (then ``config_file`` must be None).
    """
    if base is not None and base not in PRESETS and os.path.exists(base):
        if config_file is not None:
            raise ValueError("config: give either a config file or a preset plus --config-file, not two files")
        base, config_file = None, base
    file_base, file_dict = (None, {}) if config_file is None else load_config_file(config_file)
    cfg = get_preset(base or file_base or default)
    if file_dict:
        cfg = merge_dict(cfg, file_dict)
    if overrides:
        cfg = apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    return cfg


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config atomically (YAML, or JSON when ``path`` ends in .json)."""
    text = json.dumps(cfg.to_dict(), indent=2) if path.endswith(".json") else cfg.to_yaml()
    atomic_write(path, text)


# ----------------------------------------------------------------------------- dataclass <-> dict


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TypeError(f"config {where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where + ".")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config {where}: expected a list of {len(args)} values, got {value!r}")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise TypeError(f"config {where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin in (list, List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if value != "" else []
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise TypeError(f"config {where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config {where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"config {where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"config {where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"config {where}: expected a string, got {value!r}")
    return value


def _from_dict(cls: Any, d: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"config {prefix or '<root>'}: unknown field(s) {sorted(unknown)}; fields: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def validate(cfg: TrainConfig) -> None:
    """Clear errors for values that would only fail deep inside a run."""
    if cfg.mode not in ("teacher", "distill"):
        raise ValueError(f"mode: expected 'teacher' or 'distill', got {cfg.mode!r}")
    if cfg.amp not in ("none", "auto", "bf16", "fp16"):
        raise ValueError(f"amp: expected 'none', 'auto', 'bf16' or 'fp16', got {cfg.amp!r}")
    if cfg.data.kind not in ("coco", "demo", "synthetic"):
        raise ValueError(f"data.kind: expected 'coco', 'demo' or 'synthetic', got {cfg.data.kind!r}")
    if cfg.data.heatmap_encoding not in ("msra", "unbiased", "udp"):
        raise ValueError(f"data.heatmap_encoding: expected 'msra', 'unbiased' or 'udp', got {cfg.data.heatmap_encoding!r}")
    if cfg.data.heatmap_sigma is not None and not cfg.data.heatmap_sigma > 0:
        raise ValueError(f"data.heatmap_sigma: expected a positive sigma (heatmap px) or null, got {cfg.data.heatmap_sigma}")
    if cfg.data.heatmap_targets not in ("device", "worker"):
        raise ValueError(f"data.heatmap_targets: expected 'device' or 'worker', got {cfg.data.heatmap_targets!r}")
    bad = set(cfg.loss.disable) - {"token", "reg2hm", "score"}
    if bad:
        raise ValueError(f"loss.disable: unknown parts {sorted(bad)}; choose from ['reg2hm', 'score', 'token']")
    if cfg.loss.reg2hm_mode not in ("released", "per_sample"):
        raise ValueError(f"loss.reg2hm_mode: expected 'released' or 'per_sample', got {cfg.loss.reg2hm_mode!r}")
    if cfg.teacher.dtype not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"teacher.dtype: expected null, 'fp32', 'bf16' or 'fp16', got {cfg.teacher.dtype!r}")
    if cfg.optim.name not in ("adam", "adamw"):
        raise ValueError(f"optim.name: expected 'adam' or 'adamw', got {cfg.optim.name!r}")
    for name, v in (("optim.epochs", cfg.optim.epochs), ("data.batch_size", cfg.data.batch_size)):
        if v < 1:
            raise ValueError(f"{name}: expected >= 1, got {v}")
    h, w = cfg.model.input_size
    if h % 16 or w % 12:
        raise ValueError(
            f"model.input_size: expected H a multiple of 16 and W of 12 (4x3 patches on a stride-4 map), got {(h, w)}"
        )
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ValueError(f"optim.grad_clip: expected a positive max norm or null, got {cfg.optim.grad_clip}")
