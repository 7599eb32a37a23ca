"""The training engine: the DDPM paper's recipe, checkpointed and exactly resumable.

Each optimizer step:  loss = MSE(target, model(x_t, t)) (Algorithm 1) -> backward -> clip the
gradient norm -> Adam with linear warm-up -> EMA of the weights.

Randomness. All randomness of step k is seeded from (seed, k) at the start of the step:
    t and the noise  drawn for the whole global batch from a generator seeded step_seed(seed, k)
                     (every micro-batch and every DDP rank takes its slice, so the draws do not
                     depend on how the batch is split: grad accumulation and DDP are equivalent
                     to one big batch); for a class-conditional model, after them, which labels
                     are dropped to the null class (p_uncond)
    dropout          the global torch RNG, seeded from (step_seed(seed, k), rank)
    the batch        batch_fn(micro-batch index), a pure function of the index (BatchLoader)
So a run resumed from the checkpoint of step k draws exactly what an uninterrupted run would
have: on CPU the weights end up bit-identical. Saved RNG states are therefore not needed to
resume; checkpoints still carry them (torch CPU/CUDA and the generator, as uint8 tensors that
load with weights_only=True) and restore them, so that code outside the step that draws from
the global RNG continues as it would have.

Distributed (ddpm.distributed): under torchrun, the model is wrapped in DistributedDataParallel,
batch_size is the global batch (per rank: batch_size / world_size), rank 0 alone writes
checkpoints, logs and shows progress, and the logged loss is the mean over ranks.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from ddpm.checkpoint import (INDEX_BYTES, CheckpointError, ema_weights, latest_valid_checkpoint, list_checkpoints,
                             load_checkpoint, save_checkpoint)
from ddpm.data import BatchLoader, load_prepared, validate_for_model
from ddpm.diffusion import DiffusionConfig, training_loss
from ddpm.disk import DiskFull, NotWritable, check_free_space, check_writable, is_disk_full, mib, tensor_bytes
from ddpm.posthoc_ema import PowerEMA, drop_snapshots_after, sigma_rel_to_gamma, snapshot_dir
from ddpm.progress import duration, progress_bar
from ddpm.stop import STOP_REQUESTED, StopRequested
from ddpm.distributed import DistributedContext, all_reduce_mean, barrier, broadcast_object, current_context
from ddpm.unet import UNet, UNetConfig

Tensor = torch.Tensor


WARM_START_WARMUP_STEPS = 50
ESTIMATE_AFTER_STEPS = 5   # the run's duration is printed once this many steps are timed


class TrainConfig(BaseModel):
    """Optimisation settings. Defaults are the paper's CIFAR-10 optimisation (800k steps, batch 128,
    Adam at 2e-4 after a 5,000-step warm-up, gradients clipped at norm 1, EMA 0.9999) with three
    additions of this project, each off or neutral at paper scale: hflip off (the paper flips
    CIFAR-10; digits must not be flipped, so the pipeline's data decides), the EMA warm-up
    (min(decay, (1+n)/(10+n)): the same average after a few thousand steps), and p_uncond, read by
    class-conditional models only. The pipeline's own defaults are tasks.config.PipelineConfig's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(800_000, ge=1, description="optimizer steps in total")
    batch_size: int = Field(128, ge=1, description="images per optimizer step (all accumulation micro-batches)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, le=1, allow_inf_nan=False)
    warmup_steps: int = Field(5000, ge=0, description="linear learning-rate warm-up")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after the warm-up: constant (the paper), or a cosine decay to 0 at `steps`")
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="max gradient norm; None disables clipping")
    ema_decay: float = Field(0.9999, ge=0, lt=1, allow_inf_nan=False)
    p_uncond: float = Field(0.1, ge=0, lt=1, allow_inf_nan=False,
                            description="class-conditional models: the share of images trained with the null "
                                        "class instead of their label (classifier-free guidance's unconditional "
                                        "branch)")
    ema_warmup: bool = Field(True, description="decay = min(ema_decay, (1+n)/(10+n)) so short runs are not stuck at init")
    posthoc_ema: bool = Field(False, description="keep snapshots of power-function EMAs (EDM2) so that the EMA length "
                                                 "can be chosen after training (ddpm.posthoc_ema; `ddpm evaluate "
                                                 "--posthoc-ema`)")
    posthoc_ema_sigma_rels: tuple[float, ...] = Field(
        (0.05, 0.10), min_length=2, description="relative widths of the tracked power-function EMAs (EDM2's)")
    posthoc_ema_snapshots: int = Field(20, ge=2, description="snapshots of the tracked EMAs over the run: one every "
                                                             "ceil(steps / this) steps and at the last")
    hflip: bool = Field(False, description="random horizontal flips (the paper's CIFAR-10 setting)")
    seed: int = 0
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk")
    progress_images: int = Field(16, ge=0, le=64, description="images the pipeline samples from each checkpoint "
                                                              "(EMA weights, the default sampler, the same seeds "
                                                              "every time) for MLflow's image slider; 0: none")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    init_from: str | None = Field(None, description="warm start: a checkpoint whose EMA weights this run starts from "
                                                    "(same model and diffusion settings); the optimizer and the EMA "
                                                    "start afresh, the learning rate after a short warm-up (at most "
                                                    f"{WARM_START_WARMUP_STEPS} steps). Read only while the run has no "
                                                    "checkpoint of its own")
    # Speed switches, set by measurement (docs/benchmarks.md section 9): on CPU none pays at the
    # default preset, so each is on for CUDA only or off.
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="auto: bf16 autocast on CUDA only")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="layout of weights and images: auto = channels_last on CUDA only")
    compile: bool = Field(False, description="torch.compile the model (inductor, CPU or CUDA): compiled once, in the "
                                             "first step, whose time is logged as compile_seconds")
    # Data-parallel training (ddpm.distributed): the pipeline launches torchrun when world_size > 1.
    # batch_size stays the global batch, so the trajectory does not depend on these.
    num_processes: int = Field(1, ge=1, description="training processes per node, one device each (GPUs, or CPU "
                                                    "cores); more than 1 launches torchrun")
    nnodes: int = Field(1, ge=1, description="nodes training together; more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$",
                                      description="host:port of node 0, the one running the pipeline, which every "
                                                  "node reaches (nnodes > 1)")
    rdzv_timeout: float = Field(300.0, gt=0, allow_inf_nan=False,
                                description="seconds to wait for every node at the rendezvous before failing")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}: "
                "every micro-batch must hold the same number of images"
            )
        if self.world_size > 1:
            self.rank_micro_batch_size(self.world_size)
        if self.posthoc_ema:
            if len(set(self.posthoc_ema_sigma_rels)) != len(self.posthoc_ema_sigma_rels):
                raise ValueError(f"posthoc_ema_sigma_rels {self.posthoc_ema_sigma_rels} repeats a width")
            for sigma_rel in self.posthoc_ema_sigma_rels:
                sigma_rel_to_gamma(sigma_rel)   # PosthocEMAError (a ValueError) names a width out of range
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint, the host:port of the rendezvous "
                             "(one of the nodes, reachable from all)")
        return self

    @property
    def posthoc_ema_every(self) -> int:
        """Steps between post-hoc EMA snapshots (and one at the last step)."""
        return -(-self.steps // self.posthoc_ema_snapshots)

    @property
    def posthoc_ema_snapshot_count(self) -> int:
        """Snapshots a whole run writes: every multiple of posthoc_ema_every, and the last step."""
        return -(-self.steps // self.posthoc_ema_every)

    @property
    def effective_warmup_steps(self) -> int:
        """The warm-up the schedule uses: warmup_steps, at most WARM_START_WARMUP_STEPS for a warm
        start (trained weights need no long warm-up; that of a random init only wastes steps)."""
        return min(self.warmup_steps, WARM_START_WARMUP_STEPS) if self.init_from else self.warmup_steps

    def autocast_bf16(self, device: torch.device) -> bool:
        """Whether training on `device` runs under bf16 autocast."""
        return self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device.type == "cuda")

    @property
    def world_size(self) -> int:
        """Training processes in all: num_processes x nnodes."""
        return self.num_processes * self.nnodes

    @property
    def micro_batch_size(self) -> int:
        """Images per micro-batch in a single process."""
        return self.batch_size // self.grad_accum_steps

    def rank_micro_batch_size(self, world_size: int) -> int:
        """Images per micro-batch on each of `world_size` ranks: batch_size / (world_size * grad_accum_steps)."""
        if self.batch_size % (world_size * self.grad_accum_steps):
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) is not divisible by "
                f"world_size {world_size} x grad_accum_steps {self.grad_accum_steps}"
            )
        return self.batch_size // (world_size * self.grad_accum_steps)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops and its checkpoints stay as they were."""


# Errors that a rerun with the same input raises again (bad settings or data, a checkpoint of
# other settings, a NaN loss, a full disk, a folder it cannot write): retrying them only wastes time.
REPEATING_ERRORS: tuple[type[BaseException], ...] = (NonFiniteLossError, ValueError, CheckpointError, DiskFull,
                                                      NotWritable)


def is_repeating(error: BaseException) -> bool:
    """Whether a rerun would fail the same way: one of REPEATING_ERRORS, or a full disk met in a
    layer that does not raise DiskFull (the MLflow store's sqlite, a raw ENOSPC)."""
    return isinstance(error, REPEATING_ERRORS) or is_disk_full(error)


def checkpoint_disk_need(model_config: UNetConfig, train_config: TrainConfig, checkpoints_on_disk: int = 0,
                         snapshots_on_disk: int = 0) -> tuple[int, str]:
    """(bytes, what) the run's checkpoints still need on disk at its retention: a checkpoint holds
    the weights, their EMA and Adam's two moments (and the post-hoc EMAs), float32; keep_last of
    them stay, and one more exists while the next is written before the oldest goes; plus the
    post-hoc snapshots not written yet. `what` says it in words, for a message."""
    with torch.device("meta"):   # sizes without memory or time, whatever the model's size
        model = UNet(model_config)
    weights = tensor_bytes(model.state_dict())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    posthoc = len(train_config.posthoc_ema_sigma_rels) * weights if train_config.posthoc_ema else 0
    checkpoint = 2 * weights + moments + posthoc + INDEX_BYTES
    written = -(-train_config.steps // train_config.checkpoint_every)   # every multiple, and the last step
    peak = min(train_config.keep_last + 1, written)
    new_checkpoints = max(min(1, written), peak - min(checkpoints_on_disk, train_config.keep_last))
    needed, what = new_checkpoints * checkpoint, f"{new_checkpoints} checkpoint(s) of {mib(checkpoint)} " \
                                                 f"(train.keep_last {train_config.keep_last})"
    if train_config.posthoc_ema:
        snapshots = max(0, train_config.posthoc_ema_snapshot_count - snapshots_on_disk)
        needed += snapshots * (posthoc + INDEX_BYTES)
        what += f" and {snapshots} post-hoc EMA snapshot(s) of {mib(posthoc + INDEX_BYTES)}"
    return needed, what


def check_checkpoint_dir(checkpoint_dir: Path | str, model_config: UNetConfig, train_config: TrainConfig,
                         hint: str = "; free space or lower train.keep_last", runs: int = 1,
                         writable: bool = True) -> None:
    """Before training: DiskFull when the disk of `checkpoint_dir` cannot hold what the checkpoints
    of `runs` such runs still need (`checkpoint_disk_need`, counting those already there), and
    (`writable`) NotWritable when the folder cannot be written (the first checkpoint would fail
    an hour in)."""
    needed, what = checkpoint_disk_need(model_config, train_config, len(list_checkpoints(checkpoint_dir)),
                                        len(list_checkpoints(snapshot_dir(checkpoint_dir))))
    whose = "the run's" if runs == 1 else f"{runs} runs'"
    check_free_space(checkpoint_dir, runs * needed,
                     f"{whose} checkpoints in {checkpoint_dir}: {what}{' each' if runs > 1 else ''}", hint)
    if writable:
        check_writable(checkpoint_dir, "the checkpoint folder")


@dataclass
class TrainResult:
    step: int
    final_loss: float
    images_per_second: float
    checkpoints: list[Path] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    compile_seconds: float | None = None   # train.compile: the first step's time, compilation included


# TrainConfig fields that shape the training trajectory: a resume must not change them. The rest
# (steps: extend a run; logging, checkpointing, device, memory_format, compile) may differ between sessions.
TRAJECTORY_FIELDS = ("batch_size", "grad_accum_steps", "learning_rate", "warmup_steps", "lr_schedule", "grad_clip",
                     "ema_decay", "ema_warmup", "hflip", "seed", "mixed_precision", "p_uncond", "init_from",
                     "posthoc_ema", "posthoc_ema_sigma_rels")
# TrainConfig fields that say where a run trains, not what it learns: a rerun elsewhere (retrain)
# takes them from where it runs.
PLACEMENT_FIELDS = ("device", "num_processes", "nnodes", "rdzv_endpoint", "rdzv_timeout")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of config.learning_rate."""
    warmup = config.effective_warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str) -> torch.device:
    """The device `name` means on this machine; ValueError, one line, when torch does not know it
    or this machine does not have it (said before anything starts, not as a traceback in step 1)."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device name torch knows; use auto, cpu, cuda, cuda:N "
                         "or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"train.device={name!r} but this machine has no CUDA device ({build} "
                             f"{torch.__version__}); use train.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"train.device={name!r} but MPS (Apple GPUs) is not available here; use auto or cpu")
    elif device.type != "cpu":
        raise ValueError(f"train.device={name!r}: this pipeline trains on cpu, cuda or mps")
    return device


def check_compiler(device: torch.device) -> None:
    """train.compile on the CPU builds C++ kernels in the first step: without a compiler, say so
    before training starts, in one line (inductor's own search: $CXX, else g++)."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError("train.compile on the CPU needs a C++ compiler and none was found (it looks for $CXX, "
                         "else g++): install one, or set train.compile=false") from None


def step_seed(seed: int, step: int) -> int:
    """A distinct 63-bit seed for every (run seed, step)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def ema_multi_avg_fn(decay: float, warmup: bool):
    """EMA update for torch's AveragedModel: ema <- ema + (1 - d) (param - ema), all tensors at once."""

    def update(ema_params, current_params, num_averaged):
        d = current_decay(decay, warmup, int(num_averaged))
        torch._foreach_lerp_(ema_params, current_params, 1.0 - d)

    return update


def current_decay(decay: float, warmup: bool, num_averaged: int) -> float:
    """The decay of the EMA update that follows `num_averaged` earlier ones (warm-up: (1+n)/(10+n))."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged)) if warmup else decay


def last_ema_decay(decay: float, warmup: bool, n_averaged: int) -> float:
    """The decay the latest of `n_averaged` EMA updates used: AveragedModel's first update copies (0)."""
    return 0.0 if n_averaged <= 1 else current_decay(decay, warmup, n_averaged - 1)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s own randomness (dropout) within a step; rank 0 uses the step seed itself."""
    return (seed + rank * 0x94D049BB133111EB) % (2**63 - 1)


class Trainer:
    """Trains a UNet on batches given by `batch_fn(index) -> float images in [-1, 1]`, or for a
    class-conditional model (model_config.num_classes) `-> (images, int64 labels)`.

    `batch_fn` must be a pure function of its index (micro-batch number: step * grad_accum_steps
    + micro) returning this rank's micro-batch; BatchLoader(batch_size=config.rank_micro_batch_size
    (world_size), rank=, world_size=) provides exactly that. With `checkpoint_dir`, the trainer
    resumes from the newest valid checkpoint there and writes new ones every `checkpoint_every`
    steps and at the end. `distributed` defaults to the process group torchrun set up, if any.
    """

    def __init__(
        self,
        model_config: UNetConfig,
        diffusion_config: DiffusionConfig,
        train_config: TrainConfig,
        batch_fn: Callable[[int], Tensor],
        checkpoint_dir: Path | str | None = None,
        distributed: DistributedContext | None = None,
    ):
        self.model_config = model_config
        self.diffusion_config = diffusion_config
        self.config = train_config
        self.batch_fn = batch_fn
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.dist = distributed or current_context()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.micro_batch_size = train_config.rank_micro_batch_size(self.world_size)
        self.image_shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
        self.device = resolve_device(train_config.device)
        if train_config.compile:
            check_compiler(self.device)
        self.schedule = diffusion_config.make_schedule()

        torch.manual_seed(train_config.seed)  # initial weights: the same on every rank
        self.model = UNet(model_config).to(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        memory_format = train_config.memory_format
        self.channels_last = memory_format == "channels_last" or (memory_format == "auto" and self.device.type == "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(
            self.model, multi_avg_fn=ema_multi_avg_fn(train_config.ema_decay, train_config.ema_warmup), use_buffers=True
        )
        # EDM2's post-hoc EMA: power-function EMAs beside the classic one, snapshotted during the run
        self.posthoc = PowerEMA(self.model, train_config.posthoc_ema_sigma_rels) if train_config.posthoc_ema else None
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=train_config.learning_rate, fused=self.device.type == "cuda" or None
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, train_config))
        # DDP averages the gradients over ranks in backward; self.model stays the unwrapped module
        # (checkpoints, EMA and sampling use it, so their keys never carry a 'module.' prefix).
        self.ddp_model = None
        if self.dist.enabled:
            device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)
        wrapped = self.ddp_model or self.model
        self.forward_model = torch.compile(wrapped) if train_config.compile else wrapped
        self.compile_seconds: float | None = None   # the first step's time when compiling
        self.step = 0
        self.generator = torch.Generator(device=self.device)

    # --- state ---------------------------------------------------------------------------

    def rng_state(self) -> dict:
        """RNG states as uint8 tensors (weights_only-loadable). Not needed to resume: see the module doc."""
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "generator": self.generator.get_state(),
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            **({"posthoc_ema": self.posthoc.state_dict()} if self.posthoc else {}),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": self.rng_state(),
            "world_size": self.world_size,
            "model_config": self.model_config.model_dump(mode="json"),
            "diffusion_config": self.diffusion_config.model_dump(mode="json"),
            "train_config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict) -> None:
        stored = UNetConfig(**state["model_config"])
        if stored != self.model_config:
            raise CheckpointError(
                f"checkpoint was trained with model config {stored.model_dump()} "
                f"but this run asks for {self.model_config.model_dump()}"
            )
        if DiffusionConfig(**state["diffusion_config"]) != self.diffusion_config:
            raise CheckpointError(
                f"checkpoint was trained with diffusion {state['diffusion_config']} "
                f"but this run asks for {self.diffusion_config.model_dump()}"
            )
        stored_train = TrainConfig(**state["train_config"]) if "train_config" in state else self.config
        changed = [f"{name} {getattr(stored_train, name)!r} -> {getattr(self.config, name)!r}"
                   for name in TRAJECTORY_FIELDS if getattr(stored_train, name) != getattr(self.config, name)]
        if changed:
            # the optimizer state would keep the old values while the checkpoints record the new
            raise CheckpointError(f"checkpoint was trained with other settings than this run asks for: "
                                  f"{', '.join(changed)}; resume with the same settings, or train in a new folder")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.posthoc:
            self.posthoc.load_state_dict(state["posthoc_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])
        rng = state.get("rng")
        if rng:  # for completeness only: every step reseeds from (seed, step)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self.generator.set_state(rng["generator"])

    def warm_start(self, checkpoint: Path | str) -> None:
        """Start from `checkpoint`'s EMA weights (model and EMA both), at step 0 with a fresh
        optimizer and schedule: fine-tuning a model on data that grew. CheckpointError when the
        checkpoint is missing or of another model or diffusion."""
        state = check_warm_start(checkpoint, self.model_config, self.diffusion_config, map_location=self.device)
        weights = ema_weights(state) if "ema" in state else state["model"]   # a serving bundle holds only "model"
        self.model.load_state_dict(weights)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(self.config.ema_decay,
                                                                           self.config.ema_warmup), use_buffers=True)
        if self.posthoc:
            self.posthoc = PowerEMA(self.model, self.config.posthoc_ema_sigma_rels)

    def save_posthoc_snapshot(self) -> Path:
        """The post-hoc EMAs at this step, as a snapshot beside the checkpoints."""
        return self.posthoc.save_snapshot(snapshot_dir(self.checkpoint_dir), self.step, {
            "model_config": self.model_config.model_dump(mode="json"),
            "diffusion_config": self.diffusion_config.model_dump(mode="json"),
            "train_config": self.config.model_dump(mode="json")})

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.checkpoint_dir, self.step, self.config.keep_last)

    def resume(self, warn=print) -> int | None:
        """Load the newest valid checkpoint, if any; returns its step.

        Rank 0 picks it (renaming damaged newer ones to *.corrupt, with a warning naming them);
        every rank then loads that same file.
        """
        if self.checkpoint_dir is None:
            return None
        path = None
        if self.dist.is_main:
            path = latest_valid_checkpoint(self.checkpoint_dir, warn=warn, quarantine=True)
        path = broadcast_object(str(path) if path else None)
        if path is None:
            return None
        self.load_state_dict(load_checkpoint(Path(path), map_location=self.device))
        return self.step

    # --- the loop -------------------------------------------------------------------------

    def _autocast(self):
        if self.config.autocast_bf16(self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over the global batch, gradient norm before clipping).

        The global batch is laid out as [micro-batch 0: rank 0, rank 1, ...][micro-batch 1: ...]...,
        the order in which BatchLoader hands out micro-batch indices and rank slices; t and the
        noise are drawn for all of it and each (micro, rank) takes its slice.
        """
        cfg = self.config
        accum, micro = cfg.grad_accum_steps, self.micro_batch_size
        seed = step_seed(cfg.seed, self.step)
        torch.manual_seed(rank_seed(seed, self.rank))  # dropout: each rank masks its own images
        self.generator.manual_seed(seed)  # t and the noise: the same global draws on every rank
        t_global = torch.randint(
            0, self.schedule.num_timesteps, (cfg.batch_size,), device=self.device, generator=self.generator
        )
        noise_global = torch.randn((cfg.batch_size, *self.image_shape), device=self.device, generator=self.generator)
        num_classes = self.model_config.num_classes
        if num_classes:   # label dropout, drawn after t and the noise so unconditional runs draw as before
            drop_global = torch.rand(cfg.batch_size, device=self.device, generator=self.generator) < cfg.p_uncond

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for m in range(accum):
            batch = self.batch_fn(self.step * accum + m)
            x0, labels = batch if isinstance(batch, tuple) else (batch, None)
            x0 = x0.to(self.device, non_blocking=True)
            if num_classes and labels is None:
                raise ValueError("the model is class-conditional (num_classes set) but batch_fn gave no labels: "
                                 "it must return (images, labels)")
            if tuple(x0.shape) != (micro, *self.image_shape):
                raise ValueError(
                    f"batch_fn gave a batch of shape {tuple(x0.shape)}; this rank's micro-batches are "
                    f"{(micro, *self.image_shape)} (batch_size {cfg.batch_size} / (world_size {self.world_size} "
                    f"x grad_accum_steps {accum}))"
                )
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            start = (m * self.world_size + self.rank) * micro
            if num_classes:
                labels = torch.where(drop_global[start : start + micro], num_classes, labels.to(self.device))
            else:
                labels = None
            # DDP all-reduces gradients in backward: only once per step, on the last micro-batch
            sync = self.ddp_model is None or m == accum - 1
            with nullcontext() if sync else self.ddp_model.no_sync():
                with self._autocast():
                    loss = training_loss(
                        self.forward_model, self.schedule, x0, self.diffusion_config.prediction_type,
                        t=t_global[start : start + micro], noise=noise_global[start : start + micro],
                        min_snr_gamma=self.diffusion_config.min_snr_gamma, class_labels=labels,
                    )
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        # the mean over ranks: every rank sees the same value, so all stop together on NaN
        loss_value = all_reduce_mean(loss_sum / accum).item()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.step + 1}; stopping before the update. The last good "
                f"checkpoint is kept; lower the learning rate or check the data."
            )
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step + 1} (loss {loss_value:.4g}); stopping before "
                f"the update. The last good checkpoint is kept."
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        if self.posthoc:
            self.posthoc.update(self.model, self.step)
        return loss_value, grad_norm

    def train(
        self,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        stop_at: int | None = None,
        on_checkpoint: Callable[[int, Path], None] | None = None,
    ) -> TrainResult:
        """Train until `config.steps` (or `stop_at`), resuming first if a checkpoint exists.

        Every `log_every` steps, `on_log(step, metrics)` gets the window's mean loss and gradient
        norm, the learning rate, images/s (not in a window of the compiling step alone) and the EMA
        decay (and compile_seconds, in the window of the compiling step); after each checkpoint is written,
        `on_checkpoint(step, path)`. Both run on rank 0 only.
        """
        cfg = self.config
        main = self.dist.is_main
        resumed_from = self.resume()
        if resumed_from is None and cfg.init_from:
            self.warm_start(cfg.init_from)   # every rank: the same file, the same weights
        if self.posthoc and self.checkpoint_dir and main:
            # snapshots written after the checkpoint resumed from (or by a run that never saved
            # one) are written again by this run, identically
            drop_snapshots_after(self.checkpoint_dir, self.step)
            count = cfg.posthoc_ema_snapshot_count
            size = self.posthoc.snapshot_bytes()
            print(f"post-hoc EMA: widths {', '.join(f'{s:g}' for s in cfg.posthoc_ema_sigma_rels)}, a snapshot "
                  f"every {cfg.posthoc_ema_every} steps: {count} x {size / 2**20:.1f} MiB = "
                  f"{count * size / 2**20:.1f} MiB in {snapshot_dir(self.checkpoint_dir)}", flush=True)
        if self.checkpoint_dir and main and self.step < cfg.steps:   # a full disk said now, not hours later
            check_checkpoint_dir(self.checkpoint_dir, self.model_config, self.config,
                                 **({"hint": "; free space"} if resumed_from is not None else {}))   # settings are fixed now
        barrier()  # every rank has loaded before any trains
        end = min(stop_at or cfg.steps, cfg.steps)
        result = TrainResult(step=self.step, final_loss=float("nan"), images_per_second=0.0, resumed_from=resumed_from)
        window_loss, window_norm, window_steps, compiled_in_window = 0.0, 0.0, 0, False
        window_start = time.perf_counter()
        total_time, total_images = 0.0, 0
        bar = progress_bar(total=end, initial=self.step, desc="train", unit="step", disable=not (progress and main))
        timed_from: tuple[float, int] | None = None   # (time, step) after the first step: compiling excluded
        while self.step < end:
            if STOP_REQUESTED.is_set():   # a SIGTERM whose KeyboardInterrupt was swallowed (ddpm.stop)
                raise StopRequested(f"stop requested (SIGTERM) before step {self.step + 1}")
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on after it)
            step_start = time.perf_counter()
            loss, grad_norm = self.train_step()
            if cfg.compile and self.compile_seconds is None:   # the first step compiles
                self.compile_seconds, compiled_in_window = time.perf_counter() - step_start, True
            window_loss, window_norm, window_steps = window_loss + loss, window_norm + grad_norm, window_steps + 1
            bar.update(1)
            if timed_from is None:
                timed_from = (time.perf_counter(), self.step)
            elif main and self.step - timed_from[1] == ESTIMATE_AFTER_STEPS:
                # how long the whole run takes at this speed, said early (train.steps=1e12 runs for years)
                per_step = (time.perf_counter() - timed_from[0]) / ESTIMATE_AFTER_STEPS
                print(f"train: {per_step:.3g} s/step here: the {end - self.step} steps left take about "
                      f"{duration(per_step * (end - self.step))}", flush=True)
            if self.step % cfg.log_every == 0 or self.step == end:
                elapsed, timed_steps = time.perf_counter() - window_start, window_steps
                if compiled_in_window:   # compiling is a one-off cost, not throughput
                    elapsed, timed_steps = elapsed - self.compile_seconds, window_steps - 1
                if timed_steps:   # a window of the compiling step alone has no throughput to tell
                    total_time, total_images = total_time + elapsed, total_images + timed_steps * cfg.batch_size
                metrics = {
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": window_norm / window_steps,
                    "ema_decay": last_ema_decay(cfg.ema_decay, cfg.ema_warmup, int(self.ema.n_averaged)),
                }
                if timed_steps:
                    metrics["images_per_second"] = timed_steps * cfg.batch_size / max(elapsed, 1e-9)
                if compiled_in_window:
                    metrics["compile_seconds"] = self.compile_seconds
                result.loss_history.append((self.step, metrics["loss"]))
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics.get('images_per_second', 0):.0f}",
                                refresh=False)
                if on_log and main:
                    on_log(self.step, metrics)
                window_loss, window_norm, window_steps, compiled_in_window = 0.0, 0.0, 0, False
                window_start = time.perf_counter()
            # a snapshot before the checkpoint of its step: a checkpoint at step s means every snapshot up to s exists
            if self.posthoc and self.checkpoint_dir and main and (
                    self.step % cfg.posthoc_ema_every == 0 or self.step == cfg.steps):
                self.save_posthoc_snapshot()
            if self.checkpoint_dir and main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                path = self.save()
                result.checkpoints.append(path)
                if on_checkpoint:
                    on_checkpoint(self.step, path)
                window_start = time.perf_counter()  # checkpoint I/O is not training throughput
        bar.close()
        barrier()  # the last checkpoint is on disk before any rank returns
        result.step = self.step
        result.final_loss = result.loss_history[-1][1] if result.loss_history else float("nan")
        result.images_per_second = total_images / total_time if total_time else 0.0
        result.compile_seconds = self.compile_seconds
        return result


def check_warm_start(checkpoint: Path | str, model_config: UNetConfig, diffusion_config: DiffusionConfig,
                     map_location: str | torch.device = "cpu") -> dict:
    """The state of warm-start checkpoint `checkpoint`, verified and loaded; CheckpointError in one
    line when it is missing, damaged, or of another model or diffusion than this run's (the
    pipeline calls it before a run exists, the Trainer again before it trains)."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"warm start from {checkpoint}: no such checkpoint (deleted, or on another "
                              "machine?); train from scratch instead (retrain's init='scratch')")
    state = load_checkpoint(Path(checkpoint), map_location=map_location)
    for name, ours in (("model_config", model_config), ("diffusion_config", diffusion_config)):
        try:
            theirs = type(ours)(**state[name])   # validated: fields added since take their defaults
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"warm start from {checkpoint}: no valid {name} in it ({error})") from None
        if theirs != ours:
            raise CheckpointError(f"warm start from {checkpoint}: it was trained with {name.split('_')[0]} "
                                  f"{theirs.model_dump(mode='json')} but this run asks for "
                                  f"{ours.model_dump(mode='json')}")
    return state


def dataset_trainer(
    dataset_path: Path | str,
    model_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    train_config: TrainConfig,
    checkpoint_dir: Path | str | None,
    distributed: DistributedContext | None = None,
) -> Trainer:
    """A Trainer fed by a BatchLoader over the train split of a prepared dataset, sliced for this
    rank, with the labels when the model is class-conditional. The split is read in place from the
    memory-mapped images (no copy of it): the same batches as a copy of the split would give."""
    ctx = distributed or DistributedContext()
    dataset = load_prepared(Path(dataset_path))
    validate_for_model(dataset, model_config.image_size, model_config.in_channels, model_config.num_classes)
    conditional = model_config.num_classes is not None
    loader = BatchLoader(
        dataset.images, batch_size=train_config.rank_micro_batch_size(ctx.world_size), seed=train_config.seed,
        hflip=train_config.hflip, rank=ctx.rank, world_size=ctx.world_size,
        labels=dataset.labels if conditional else None, index=dataset.train_indices,
    )
    batch_fn = loader.labelled_batch if conditional else loader.batch
    return Trainer(model_config, diffusion_config, train_config, batch_fn, checkpoint_dir, distributed=ctx)
