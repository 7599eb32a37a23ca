"""Training batches straight from a uint8 tensor: one gather, one cast, no per-image Python."""
from __future__ import annotations

import numpy as np
import torch


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing the parts (SeedSequence: no collisions between (s, e) pairs in practice)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class BatchLoader:
    """Batches straight from a uint8 tensor: no per-image Python work. Stateless in the step:
    the batch for global step k is a pure function of (seed, k), so a resumed run (and each
    DDP rank) gets exactly the batches an uninterrupted run would.

    Step k belongs to epoch k // steps_per_epoch; each epoch visits the images in a permutation
    seeded by (seed, epoch). The global batch is batch_size * world_size images; rank r takes
    its r-th slice. Horizontal flips (the paper's only augmentation) are drawn per image of
    the global batch from (seed, step), so the ranks' slices together equal the batch a single
    process with batch_size * world_size would see. The images tensor is moved to `device`
    once; each batch is then a gather, a flip and a scale to [-1, 1] on that device. With
    `labels` (one per image), `labelled_batch` gives the batch's labels too.

    `index` (int64 rows of images_uint8): train on those rows only, read in place (a prepared
    dataset's memory-mapped images and its train_indices: no copy of the split). The batches are
    exactly those of BatchLoader(images_uint8[index], ...) (labels likewise: one per row of
    images_uint8). On another device than the CPU the rows are copied there once, as before.
    """

    def __init__(self, images_uint8: torch.Tensor, batch_size: int, seed: int = 0, hflip: bool = False,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, labels: torch.Tensor | None = None, index: torch.Tensor | None = None):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images_uint8 must be a uint8 (N, C, H, W) tensor, got "
                             f"{images_uint8.dtype} {tuple(images_uint8.shape)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if labels is not None and labels.shape != (len(images_uint8),):
            raise ValueError(f"labels must have shape ({len(images_uint8)},), one per image, got {tuple(labels.shape)}")
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.int64)
            if index.dim() != 1 or (len(index) and (index.min() < 0 or index.max() >= len(images_uint8))):
                raise ValueError(f"index must be 1-D rows of images_uint8 (0..{len(images_uint8) - 1})")
            if torch.device(device).type != "cpu":   # the device holds the split only
                images_uint8 = images_uint8[index]
                labels = labels[index] if labels is not None else None
                index = None
        self.index = index.to(device) if index is not None else None
        self.images = images_uint8.to(device)
        self.labels = labels.long().to(device) if labels is not None else None
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.device = torch.device(device)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        n = len(images_uint8) if self.index is None else len(self.index)
        self._n = n
        if drop_last and n < self.global_batch:
            raise ValueError(f"{n} images cannot fill one global batch of {self.global_batch} "
                             "(batch_size * world_size) with drop_last=True")
        self.steps_per_epoch = n // self.global_batch if drop_last else -(-n // self.global_batch)
        self._epoch, self._perm = None, None   # cache of the last epoch's permutation

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, 0))
            self._perm = torch.randperm(self._n, generator=g).to(self.device)
            if self.index is not None:
                self._perm = self.index[self._perm]   # rows of images
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Indices (into images) of this rank's part of the global batch at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        """float32 (B, C, H, W) in [-1, 1] on device: this rank's batch at global step `step`."""
        x = self.images.index_select(0, self.indices(step))
        if self.hflip:
            g = torch.Generator().manual_seed(_seed(self.seed, step, 1))
            flip = torch.rand(self.global_batch, generator=g) < 0.5
            flip = flip[self.rank * self.batch_size:][:len(x)].to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.float().mul_(2.0 / 255.0).sub_(1.0)

    def labelled_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images as `batch` gives them, their int64 labels): a class-conditional model's batch."""
        if self.labels is None:
            raise ValueError("this BatchLoader was given no labels")
        return self.batch(step), self.labels.index_select(0, self.indices(step))

    def __iter__(self):
        """One epoch from step 0 (convenience; training loops should call batch(step))."""
        return (self.batch(k) for k in range(self.steps_per_epoch))
