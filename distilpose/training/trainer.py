"""The training loop shared by teacher training and student distillation.

- Single process or DDP under ``torchrun`` (process group from the environment; gloo on CPU,
  nccl on CUDA), a DistributedSampler, rank-0 logging and checkpointing, evaluation gathered
  across ranks.
- AMP (bf16 / fp16 autocast; a GradScaler for fp16), gradient clipping, channels-last.
- Exact resume: ``last.pth`` holds model, optimizer, scheduler, scaler, epoch and step inside
  the epoch, and the RNG states of every rank. Augmentation randomness is a pure function of
  (seed, epoch, sample index): every sample is fetched under its own seed, so a resumed run sees
  exactly the batches of an uninterrupted one, whatever the number of loader workers.
- tqdm bars with the loss terms and images/s, ``metrics.jsonl``, optional TensorBoard.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import distilpose_kernels as dk

from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ..losses import teacher_loss
from ..models import build_model
from ..models.distiller import Distiller, LossWeights
from ..fileio import atomic_write
from .config import TrainConfig, save_config, validate
from .optim import build_optimizer, build_scheduler

# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {device!r} asked for but CUDA is not available")
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device: process with LOCAL_RANK={local_rank} needs cuda:{dev.index} but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible; start at most that many processes "
                "per node (torchrun --nproc_per_node) or pass --set device=cpu"
            )
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(rank, world, local_rank, dev, here)


def _all_gather_object(obj: Any, info: DistInfo) -> List[Any]:
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SeededDataset(Dataset):
    """Fetches ``dataset[index]`` for a key (epoch, index) under the seed (seed, epoch, index).

    Python's, NumPy's and torch's global RNGs are seeded for the call and restored afterwards,
    so augmentation is reproducible and the caller's RNG streams are untouched. Datasets that
    take a seed themselves (``reseed(seed)``, as TopDownCocoDataset) get it as well.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state, t_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.random.default_generator.manual_seed(s)
            hook = getattr(self.dataset, "reseed", None) or getattr(self.dataset, "set_sample_seed", None)
            if hook is not None:  # datasets with their own augmentation generator (distilpose.data)
                hook(s)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.set_rng_state(t_state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start inside an epoch and yields (epoch, index) keys."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_start(self, start_index: int) -> None:
        self.start_index = int(start_index)

    def __iter__(self):
        indices = list(super().__iter__())[self.start_index :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


def _topdown_kwargs(cls: Any, input_size: Tuple[int, int]) -> Dict[str, Any]:
    import inspect

    params = inspect.signature(cls).parameters
    if "input_size" in params:
        kw: Dict[str, Any] = {"input_size": tuple(input_size)}
        if "heatmap_size" in params:
            kw["heatmap_size"] = (input_size[0] // 4, input_size[1] // 4)
        return kw
    if tuple(input_size) != (256, 192):
        raise ValueError(
            f"model.input_size {tuple(input_size)}: {cls.__name__} does not take an input size; use (256, 192)"
        )
    return {}


def teacher_target_sigma(cfg: TrainConfig) -> float:
    """The teacher targets' sigma in heatmap px: ``data.heatmap_sigma``, or the spec's 2 for 64 x 48
    heatmaps scaled with the crop (smaller crops keep the Gaussians as sharp)."""
    d = cfg.data
    return float(d.heatmap_sigma) if d.heatmap_sigma is not None else 2.0 * cfg.model.input_size[0] / 256


def device_heatmap_targets(cfg: TrainConfig) -> bool:
    """Whether a teacher run builds its heatmap targets per batch on the device (the COCO and demo
    datasets; the synthetic test set draws its own)."""
    return cfg.mode == "teacher" and cfg.data.heatmap_targets == "device" and cfg.data.kind != "synthetic"


def heatmap_targets_for(dataset: Any, model: nn.Module) -> nn.Module:
    """``GaussianHeatmapTargets`` for a dataset that sends keypoints (``heatmap_keypoints=True``):
    its input and heatmap sizes, sigma and encoding. ValueError when its heatmaps would not be
    the model's size."""
    hs = tuple(int(v) for v in dataset.heatmap_size)
    model_hs = tuple(getattr(model, "heatmap_size", hs))
    if hs != model_hs:
        raise ValueError(f"train dataset: heatmap_size {hs} does not match the model's heatmaps {model_hs}")
    return dk.GaussianHeatmapTargets(tuple(dataset.input_size), hs, dataset.heatmap_sigma, dataset.heatmap_encoding)


def build_datasets(cfg: TrainConfig, with_heatmaps: bool,
                   heatmap_keypoints: bool = False) -> Tuple[Dataset, Optional[Dataset]]:
    """(train, val) datasets for ``cfg.data``; ``heatmap_keypoints``: training samples carry the
    heatmap targets' inputs (see ``TopDownCocoDataset``)."""
    d = cfg.data
    if d.kind == "synthetic":
        from .synthetic import SyntheticPoseDataset

        kw = dict(input_size=cfg.model.input_size, num_keypoints=cfg.model.num_keypoints, seed=d.demo_seed)
        # no COCO annotations behind it: nothing to evaluate with COCOeval
        return SyntheticPoseDataset(d.demo_num_train, train=True, with_heatmaps=with_heatmaps, **kw), None
    from ..data import TopDownCocoDataset

    if d.kind == "demo":
        from ..data import demo as demo_data

        root = d.root or demo_data.default_demo_root()
        paths = ensure_demo_dataset(root, d.demo_num_train, d.demo_num_val, d.demo_seed)
        train_ann, train_img, val_ann, val_img = (
            paths["train_ann"], paths["train_img"], paths["val_ann"], paths["val_img"],
        )
    else:
        if not d.root:
            raise ValueError("data.root: the COCO root is required for data.kind=coco (e.g. --data-root /data/coco)")
        j = lambda p: p if os.path.isabs(p) else os.path.join(d.root, p)  # noqa: E731
        train_ann, train_img, val_ann, val_img = j(d.train_ann), j(d.train_img), j(d.val_ann), j(d.val_img)
    aug = d.aug or ("teacher" if cfg.mode == "teacher" else "student")
    aug = None if aug == "none" else aug
    kw = _topdown_kwargs(TopDownCocoDataset, cfg.model.input_size)
    train = TopDownCocoDataset(
        train_ann, train_img, train=True, aug=aug, with_heatmaps=with_heatmaps,
        heatmap_encoding=d.heatmap_encoding, heatmap_sigma=teacher_target_sigma(cfg),
        heatmap_keypoints=heatmap_keypoints, bad_sample=d.bad_sample, **kw,
    )
    val = TopDownCocoDataset(
        val_ann, val_img, train=False, aug=None, with_heatmaps=False, det_file=d.det_file,
        det_score_thr=d.det_score_thr, bad_sample=d.bad_sample, **kw,
    )
    return train, val


def ensure_demo_dataset(root: str, num_train: int, num_val: int, seed: int, progress: bool = False) -> Dict[str, str]:
    """Generate the embedded dataset under ``root`` unless a matching one is already there."""
    from ..data import demo as demo_data

    paths = demo_data.generate_demo_dataset(root, num_train=num_train, num_val=num_val, seed=seed, progress=progress)
    return _demo_paths(root, paths)


def _demo_paths(root: str, paths: Dict[str, Any]) -> Dict[str, str]:
    def pick(*names: str, default: str) -> str:
        for n in names:
            if n in paths:
                return str(paths[n])
        return os.path.join(root, default)

    return {
        "train_ann": pick("train_ann", "ann_train", "train_ann_file", default="annotations/person_keypoints_train.json"),
        "train_img": pick("train_img", "img_train", "train_img_prefix", "train_images", default="images/train"),
        "val_ann": pick("val_ann", "ann_val", "val_ann_file", default="annotations/person_keypoints_val.json"),
        "val_img": pick("val_img", "img_val", "val_img_prefix", "val_images", default="images/val"),
    }


# ----------------------------------------------------------------------------- models


def model_meta(model: nn.Module, cfg_model: Any) -> Dict[str, Any]:
    return {
        "preset": model.name,
        "kind": model.kind,
        "input_size": list(model.input_size),
        "num_keypoints": model.num_keypoints,
        "model_overrides": dict(getattr(cfg_model, "overrides", {}) or {}),
    }


class TeacherObjective(nn.Module):
    """Wraps a heatmap model so forward(batch) returns the loss dict, like the Distiller.

    targets: a ``distilpose_kernels.GaussianHeatmapTargets``; a batch without "heatmaps" then gets
    them from its "heatmap_keypoints" (N, K, 2) crop px and "heatmap_visibility" (N, K), on the
    batch's device, in one call (a kernel on the GPU) instead of one per sample in the workers.
    """

    def __init__(self, model: nn.Module, targets: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.targets = targets

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if "heatmaps" not in batch:
            if self.targets is None or "heatmap_keypoints" not in batch:
                raise KeyError(
                    "batch: a teacher batch needs 'heatmaps' and 'heatmap_weight', or 'heatmap_keypoints' and "
                    "'heatmap_visibility' with TeacherObjective(targets=...) (data.heatmap_targets='device')"
                )
            heatmaps, weight = self.targets(batch["heatmap_keypoints"], batch["heatmap_visibility"])
            batch = {**batch, "heatmaps": heatmaps, "heatmap_weight": weight}
        return teacher_loss(self.model(batch["img"]), batch)


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> Dict[str, Any]:
    """Every RNG stream of this process, as tensors, tuples and numbers only (so a checkpoint that
    holds it loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"python": random.getstate(),
         "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
         "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]  # keys: a tensor (this version) or a numpy array (older checkpoints)
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), *rest))
    torch.random.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- trainer


class StopTraining(Exception):
    """Raised by a hook to end a run early (the trainer does not save on it: a simulated kill)."""


class Trainer:
    """Builds everything from a TrainConfig and runs ``fit()``.

    ``train_dataset`` / ``val_dataset`` replace the datasets of ``cfg.data`` (tests, custom data).
    ``hooks``: callables ``hook(trainer)`` run after every optimizer step (may raise to stop).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train_dataset: Optional[Dataset] = None,
        val_dataset: Optional[Dataset] = None,
        hooks: Sequence[Callable[["Trainer"], None]] = (),
        teacher: Optional[nn.Module] = None,
    ):
        validate(cfg)
        self.cfg = cfg
        self.hooks = list(hooks)
        self.info = setup_distributed(cfg.device)
        self.device = self.info.device
        self.work_dir = cfg.work_dir
        seed_everything(cfg.seed)

        # model and objective
        self.model = build_model(
            cfg.model.preset,
            num_keypoints=cfg.model.num_keypoints,
            attention_backend=cfg.model.attention_backend,
            input_size=tuple(cfg.model.input_size),
            **cfg.model.overrides,
        )
        if cfg.mode == "teacher":
            if self.model.kind != "teacher":
                raise ValueError(f"model.preset {cfg.model.preset!r} is a student; mode 'teacher' needs a heatmap model")
            self.teacher = None
            self.objective: nn.Module = TeacherObjective(self.model)  # targets: set with the data below
        else:
            if self.model.kind != "student":
                raise ValueError(f"model.preset {cfg.model.preset!r} is a teacher; mode 'distill' needs a student")
            self.teacher = teacher if teacher is not None else self._load_teacher()
            lw = cfg.loss
            weights = LossWeights(**{f.name: getattr(lw, f.name) for f in dataclasses.fields(LossWeights)})
            tdt = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # validated in config
            self.objective = Distiller(
                self.model, self.teacher, weights=weights, reg2hm_mode=lw.reg2hm_mode, disable=lw.disable,
                loss_backend=lw.backend, fold_teacher_bn=cfg.teacher.fold_bn, teacher_dtype=tdt[cfg.teacher.dtype],
                fuse_teacher_epilogues=cfg.teacher.fuse_epilogues, teacher_channels_last=cfg.teacher.channels_last,
                teacher_cuda_graph=cfg.teacher.cuda_graph,
            )
        if cfg.sync_bn and self.info.distributed and self.device.type == "cuda":
            self.objective = nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
            self.model = self.objective.model if cfg.mode == "teacher" else self.objective.student
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.objective.to(self.device, memory_format=mf)

        # data
        if train_dataset is None:
            on_device = device_heatmap_targets(cfg)
            train_dataset, built_val = build_datasets(
                cfg, with_heatmaps=cfg.mode == "teacher" and not on_device, heatmap_keypoints=on_device)
            val_dataset = val_dataset if val_dataset is not None else built_val
        if cfg.mode == "teacher" and getattr(train_dataset, "heatmap_keypoints", False):
            # the batch's heatmaps are made in the step, with the dataset's own target settings
            self.objective.targets = heatmap_targets_for(train_dataset, self.model)
        elif cfg.mode == "teacher" and getattr(train_dataset, "with_heatmaps", None) is False:
            raise ValueError(
                "train dataset: a teacher run needs heatmap targets: a dataset with with_heatmaps=True, or "
                "heatmap_keypoints=True (the step then builds them on the device)"
            )

        self.ddp: nn.Module = self.objective
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.objective, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.sampler = ResumableSampler(
            SeededDataset(train_dataset, cfg.seed), self.info.world_size, self.info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.iters_per_epoch = self.sampler.num_samples // cfg.data.batch_size
        if self.iters_per_epoch < 1:
            raise ValueError(
                f"data.batch_size {cfg.data.batch_size} x {self.info.world_size} process(es) is larger than the "
                f"training set ({len(train_dataset)} samples)"
            )
        self.total_steps = cfg.optim.epochs * self.iters_per_epoch

        # optimisation
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.iters_per_epoch)
        self.amp_dtype = self._resolve_amp()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        # progress state
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.last_eval: Dict[str, float] = {}
        self.stop_reason: Optional[str] = None
        self._tb = None
        self._last_log_time = time.perf_counter()
        self._last_log_step = 0

    # -- setup helpers
    def _load_teacher(self) -> Optional[nn.Module]:
        t = self.cfg.teacher
        if t.preset is None:
            return None
        if not t.checkpoint:
            raise ValueError(
                "teacher.checkpoint: distillation needs a trained teacher (--teacher-checkpoint PATH), "
                "or teacher.preset=null for the plain regression baseline"
            )
        ckpt = read_checkpoint(t.checkpoint)
        meta = ckpt.get("meta") or {}
        if meta.get("preset") and meta.get("preset") != t.preset:
            raise ValueError(f"teacher.checkpoint {t.checkpoint!r} holds preset {meta['preset']!r}, not teacher.preset {t.preset!r}")
        kw = dict(meta.get("model_overrides") or t.overrides or {})
        size = tuple(meta.get("input_size") or self.cfg.model.input_size)
        if size != tuple(self.cfg.model.input_size):
            raise ValueError(f"teacher.checkpoint: input size {size} differs from the student's {tuple(self.cfg.model.input_size)}")
        teacher = build_model(t.preset, num_keypoints=self.cfg.model.num_keypoints, input_size=size, **kw)
        load_checkpoint(t.checkpoint, teacher, strict=True)
        return teacher

    def _resolve_amp(self) -> Optional[torch.dtype]:
        amp = self.cfg.amp
        if amp == "none":
            return None
        if amp == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- checkpoints
    @property
    def last_path(self) -> str:
        return os.path.join(self.work_dir, "last.pth")

    @property
    def best_path(self) -> str:
        return os.path.join(self.work_dir, "best.pth")

    def state_dict(self) -> Dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "best_metric": self.best_metric,
                "best_epoch": self.best_epoch,
                "world_size": self.info.world_size,
                "stop_reason": self.stop_reason,
                "iters_per_epoch": self.iters_per_epoch,
            },
            "config": self.cfg.to_dict(),
        }

    def save_last(self) -> None:
        rngs = _all_gather_object(rng_state(), self.info)  # every rank's streams, kept by rank 0
        if self.info.is_main:
            save_checkpoint(self.last_path, self.model, meta=model_meta(self.model, self.cfg.model), rng=rngs, **self.state_dict())
        if self.info.distributed:
            dist.barrier()

    def resume(self, path: str) -> None:
        """Continue from a ``last.pth``: weights, optimizer, scheduler, scaler, position, RNGs."""
        ckpt = read_checkpoint(path)
        for key in ("optimizer", "scheduler", "trainer", "rng"):
            if key not in ckpt:
                raise ValueError(f"resume: {path!r} is not a training checkpoint (no {key!r}); use it as weights instead")
        tr = ckpt["trainer"]
        # the batch size itself, not only iterations/epoch: two batch sizes can give the same
        # number of iterations but would start the resumed epoch at another sample
        old_bs = ((ckpt.get("config") or {}).get("data") or {}).get("batch_size", self.cfg.data.batch_size)
        if (tr["world_size"] != self.info.world_size or tr["iters_per_epoch"] != self.iters_per_epoch
                or old_bs != self.cfg.data.batch_size):
            raise ValueError(
                f"resume: {path!r} was written with {tr['world_size']} process(es), batch size {old_bs} and "
                f"{tr['iters_per_epoch']} iterations/epoch; this run has {self.info.world_size}, "
                f"{self.cfg.data.batch_size} and {self.iters_per_epoch}. "
                "Resume with the same world size and batch size."
            )
        load_checkpoint(path, self.model, strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = tr["epoch"], tr["step_in_epoch"], tr["global_step"]
        self.best_metric, self.best_epoch = tr["best_metric"], tr["best_epoch"]
        # best.pth is written before last.pth at an epoch end: a run killed between the two has
        # a best.pth better than last.pth knows of, which a later (worse) evaluation must not replace
        if os.path.isfile(self.best_path):
            try:
                b = read_checkpoint(self.best_path)
                ap = (b.get("metrics") or {}).get("AP")
            except Exception:
                ap = None
            if ap is not None and (self.best_metric is None or float(ap) > self.best_metric):
                self.best_metric, self.best_epoch = float(ap), b.get("epoch")
        set_rng_state(ckpt["rng"][self.info.rank])
        if self._is_done():
            return  # nothing left to train: fit() says so and leaves metrics.jsonl as it is
        if self.info.is_main:
            self._truncate_metrics(self.global_step)
            self.log({"type": "resume", "step": self.global_step, "epoch": self.epoch, "from": os.path.abspath(path)})

    def _is_done(self) -> bool:
        return self.epoch >= self.cfg.optim.epochs or (
            self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps)

    # -- logging
    @property
    def metrics_path(self) -> str:
        return os.path.join(self.work_dir, "metrics.jsonl")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines logged after the resume point (those steps are replayed)."""
        if not os.path.exists(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if rec.get("step", 0) <= step:
                    keep.append(json.dumps(rec))
        atomic_write(self.metrics_path, "".join(k + "\n" for k in keep))

    def log(self, rec: Dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        rec = {"time": round(time.time(), 3), **rec}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None:
            step = rec.get("step", self.global_step)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time", "epoch"):
                    self._tb.add_scalar(f"{rec.get('type', 'train')}/{k}", v, step)

    def _open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.info.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard: not installed (pip install tensorboard); logging to metrics.jsonl only")
            return
        self._tb = SummaryWriter(os.path.join(self.work_dir, "tb"))

    # -- evaluation
    def evaluate(self) -> Dict[str, float]:
        """COCO keypoint AP on the val set. Under DDP each rank predicts its share; rank 0 scores all."""
        if self.val_dataset is None:
            return {}
        try:
            from .. import evaluation
        except ImportError as e:
            if self.info.is_main:
                print(f"evaluation skipped: distilpose.evaluation is not importable ({e})")
            return {}

        model = self.model
        was_training = model.training
        model.eval()
        try:
            metrics: Optional[Dict[str, float]] = None
            if self.info.distributed:
                # each rank predicts its share; predict() gathers the raw results on every rank
                sampler = DistributedSampler(self.val_dataset, self.info.world_size, self.info.rank, shuffle=False)
                loader = self._val_loader(self.val_dataset, sampler)
                results = evaluation.predict(model, loader, flip_test=self.cfg.flip_test, device=self.device)
                if self.info.is_main:
                    metrics = evaluation.coco_keypoint_eval(self.val_dataset.coco, results)
            elif self.info.is_main:
                loader = self._val_loader(self.val_dataset)
                metrics = evaluation.evaluate(model, loader, flip_test=self.cfg.flip_test, device=self.device)
            metrics = _broadcast_object(metrics, self.info)
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def _val_loader(self, dataset: Dataset, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.cfg.data.val_batch_size, shuffle=False, sampler=sampler, num_workers=self.cfg.data.num_workers,
            generator=torch.Generator().manual_seed(0),  # worker seeds must not consume the training RNG
        )

    def _maybe_evaluate(self, epoch_done: int, final: bool) -> None:
        due = self.cfg.eval_interval > 0 and epoch_done % self.cfg.eval_interval == 0
        if not (due or (final and self.cfg.final_eval)) or self.val_dataset is None:
            return
        t0 = time.perf_counter()
        m = self.evaluate()
        if not m:
            return
        self.last_eval = m
        self.log({"type": "val", "step": self.global_step, "epoch": epoch_done, "eval_s": round(time.perf_counter() - t0, 2), **m})
        ap = m.get("AP")
        if ap is not None and (self.best_metric is None or ap > self.best_metric):
            self.best_metric, self.best_epoch = ap, epoch_done
            if self.info.is_main:
                save_checkpoint(
                    self.best_path, self.model, meta=model_meta(self.model, self.cfg.model), metrics=m, epoch=epoch_done, step=self.global_step
                )

    # -- the loop
    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        nb = self.device.type == "cuda"
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=nb)
                if k == "img" and self.cfg.channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        batch = self._to_device(batch)
        with self._autocast():
            losses = self.ddp(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss).all() and self.amp_dtype != torch.float16:
            terms = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"non-finite loss at step {self.global_step} (epoch {self.epoch}): {terms}")
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    def _should_stop(self, t_start: float) -> bool:
        """max_steps / max_time_s reached (the time decision is rank 0's, so all ranks stop together)."""
        cfg = self.cfg
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            self.stop_reason = "max_steps"
            return True
        if cfg.max_time_s is not None:
            out = _broadcast_object(time.perf_counter() - t_start >= cfg.max_time_s, self.info)
            if out:
                self.stop_reason = "max_time_s"
                if self.info.is_main:
                    print(f"{cfg.name}: time budget max_time_s={cfg.max_time_s:g} s reached at step {self.global_step} "
                          f"(epoch {self.epoch + self.step_in_epoch / self.iters_per_epoch:.2f} of {cfg.optim.epochs})")
                return True
        return False

    def fit(self, resume: Optional[str] = None) -> Dict[str, Any]:
        """Train to ``optim.epochs`` (or ``max_steps``). Returns a summary dict."""
        if self.info.is_main:
            os.makedirs(self.work_dir, exist_ok=True)
            self._lock_work_dir()
            self._remove_stale_temp_files()
        try:
            return self._fit(resume)
        finally:
            self._unlock_work_dir()

    def _lock_work_dir(self) -> None:
        """An exclusive lock on ``work_dir/.lock`` for the run: a second run on the same folder
        would interleave metrics.jsonl and overwrite the first one's checkpoints. The kernel
        drops the lock when the process dies, so a killed run never leaves it behind."""
        self._lock_fd = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        fd = os.open(os.path.join(self.work_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"work_dir {self.work_dir!r} is in use by another training run (locked: {os.path.join(self.work_dir, '.lock')}); "
                "wait for it to end or pick another --work-dir") from None
        self._lock_fd = fd

    def _remove_stale_temp_files(self) -> None:
        """Checkpoint temp files (``.tmp-*.pth``) a killed run left mid-write: with the work dir
        locked, no other run can be writing them."""
        if getattr(self, "_lock_fd", None) is None:
            return  # no lock (not POSIX): another run might own them
        for name in os.listdir(self.work_dir):
            if name.startswith(".tmp-") and name.endswith(".pth"):
                try:
                    os.unlink(os.path.join(self.work_dir, name))
                except OSError:
                    pass

    def _unlock_work_dir(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # releases the flock
            self._lock_fd = None

    def _set_aside_previous_run(self) -> Optional[str]:
        """A fresh run (no resume) in a work dir that holds an earlier run's files moves them to
        ``work_dir/previous-<time>/`` first: nothing the earlier run wrote is overwritten."""
        found = [p for p in (self.last_path, self.best_path, self.metrics_path) if os.path.exists(p)]
        if not found:
            return None
        config = os.path.join(self.work_dir, "config.yaml")
        stamp = os.path.join(self.work_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
        dest, i = stamp, 1
        while os.path.exists(dest):
            dest, i = f"{stamp}-{i}", i + 1
        os.makedirs(dest)
        for p in found + ([config] if os.path.exists(config) else []):
            os.replace(p, os.path.join(dest, os.path.basename(p)))
        print(f"{self.cfg.name}: {self.work_dir} held an earlier run; its files were moved to {dest} "
              "(pass --resume to continue a run instead)")
        return dest

    def _summary(self, finished: bool, stop_reason: Optional[str], train_s: float) -> Dict[str, Any]:
        return {"finished": finished, "stop_reason": stop_reason, "epoch": self.epoch, "global_step": self.global_step,
                "train_s": train_s, "best_AP": self.best_metric, "best_epoch": self.best_epoch,
                "last_eval": self.last_eval, "last_path": self.last_path,
                "best_path": self.best_path if self.best_metric is not None else None}

    def _fit(self, resume: Optional[str]) -> Dict[str, Any]:
        cfg = self.cfg
        if resume:
            self.resume(resume)  # validates before anything in work_dir is touched
        elif self.info.is_main:
            self._set_aside_previous_run()
        if self.info.is_main:
            save_config(cfg, os.path.join(self.work_dir, "config.yaml"))
        if resume and self._is_done():
            if self.info.is_main:
                print(f"{cfg.name}: {resume} is already at epoch {self.epoch}, step {self.global_step}: nothing to do "
                      "(raise optim.epochs / max_steps to train further)")
            finished = self.epoch >= cfg.optim.epochs
            return self._summary(finished, None if finished else "max_steps", 0.0)
        self._open_tensorboard()
        self.model.train()
        stopped = False
        bs_total = cfg.data.batch_size * self.info.world_size
        t_start = time.perf_counter()
        try:
            while self.epoch < cfg.optim.epochs and not stopped:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.step_in_epoch * cfg.data.batch_size)
                loader = DataLoader(
                    self.sampler.dataset,
                    batch_size=cfg.data.batch_size,
                    sampler=self.sampler,
                    num_workers=cfg.data.num_workers,
                    pin_memory=self.device.type == "cuda",
                    drop_last=True,
                    generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
                    persistent_workers=False,
                )
                bar = None
                if cfg.progress and self.info.is_main:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=self.iters_per_epoch, initial=self.step_in_epoch, desc=f"{cfg.name} epoch {self.epoch + 1}/{cfg.optim.epochs}",
                        dynamic_ncols=True, leave=False,
                        # redraw at most every 30 s when stderr is a log file, not a terminal
                        mininterval=0.1 if sys.stderr.isatty() else 30.0,
                    )
                self._last_log_time, self._last_log_step = time.perf_counter(), self.global_step
                for batch in loader:
                    terms = self.train_step(batch)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    now = time.perf_counter()
                    ips = (self.global_step - self._last_log_step) * bs_total / max(now - self._last_log_time, 1e-9)
                    if bar is not None:
                        short = {k.replace("loss_", ""): f"{v:.4g}" for k, v in terms.items()}
                        bar.set_postfix(short, refresh=False, img_s=f"{ips:.1f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                        bar.update(1)
                    if self.global_step % cfg.log_interval == 0 or self.step_in_epoch == self.iters_per_epoch:
                        self.log({
                            "type": "train", "step": self.global_step, "epoch": self.epoch + self.step_in_epoch / self.iters_per_epoch,
                            "lr": self.optimizer.param_groups[0]["lr"], "img_s": round(ips, 2), **terms,
                        })
                        self._last_log_time, self._last_log_step = now, self.global_step
                    if self.step_in_epoch == self.iters_per_epoch:
                        break
                    if cfg.ckpt_interval_steps and self.global_step % cfg.ckpt_interval_steps == 0:
                        self.save_last()
                    for hook in self.hooks:
                        hook(self)
                    if self._should_stop(t_start):
                        stopped = True
                        break
                if bar is not None:
                    bar.close()
                if self.step_in_epoch == self.iters_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self._maybe_evaluate(self.epoch, final=self.epoch == cfg.optim.epochs)
                    self.save_last()
                    for hook in self.hooks:
                        hook(self)
                    if self.epoch < cfg.optim.epochs and self._should_stop(t_start):
                        stopped = True
                else:
                    if self.stop_reason == "max_time_s":
                        self._maybe_evaluate(self.epoch, final=True)
                    self.save_last()
        finally:
            if self._tb is not None:
                self._tb.close()
        summary = self._summary(not stopped, self.stop_reason if stopped else None,
                                round(time.perf_counter() - t_start, 2))
        if self.info.distributed:
            digests = _all_gather_object(params_digest(self.model), self.info)
            summary["param_digests"] = digests
            self.log({"type": "ddp_sync", "step": self.global_step, "world_size": self.info.world_size, "param_digests": digests})
            if len(set(digests)) != 1:
                raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests}")
        self.log({"type": "end", "step": self.global_step, **{k: v for k, v in summary.items() if k != "param_digests"}})
        return summary

    def close(self) -> None:
        if self.info.initialized_here and dist.is_initialized():
            if dist.get_backend() == "gloo":
                # let every rank arrive before any tears gloo down: a rank destroying its group
                # while a peer was still finishing aborted the process once in CI ("terminate
                # called without an active exception", SIGABRT after a finished run). Bounded:
                # a peer that failed (close runs in a finally) cannot hang this rank.
                try:
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                except RuntimeError:
                    pass
            dist.destroy_process_group()
