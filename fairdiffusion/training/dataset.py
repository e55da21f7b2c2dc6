"""The training rows as a torch dataset, and the sampler that draws one global batch for all processes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from fairdiffusion import files
from fairdiffusion.data.images import centre_offsets, resize_and_crop
from fairdiffusion.training.fbp import derive_seed


class FundusPromptDataset(Dataset):
    """Images, tokenised prompts and group codes of the training rows.

    Images are resized and cropped by :func:`fairdiffusion.data.images.resize_and_crop`, the
    function evaluation prepares the real images with. Random augmentations (random crop,
    flip) are drawn from a generator seeded by ``(seed, epoch, index)``, so they do not
    depend on workers, processes or resumes.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        attributes: Mapping[str, Sequence[str]],
        tokenizer: object,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.paths = samples["image_path"].tolist()
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0
        tokens = tokenizer(  # type: ignore[operator]
            samples["prompt"].tolist(),
            padding="max_length",
            max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
            truncation=True,
            return_tensors="pt",
        )
        self.input_ids = tokens.input_ids
        codes = [samples[a].map({g: i for i, g in enumerate(groups)}) for a, groups in attributes.items()]
        self.groups = torch.tensor(np.stack([c.to_numpy(dtype=np.int64) for c in codes], axis=1))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))

        def random_offsets(slack_x: int, slack_y: int) -> tuple[int, int]:
            left = int(torch.randint(0, slack_x + 1, (1,), generator=generator))
            top = int(torch.randint(0, slack_y + 1, (1,), generator=generator))
            return left, top

        image = files.open_image(self.paths[index])
        rgb = resize_and_crop(image, self.resolution, centre_offsets if self.center_crop else random_offsets)
        if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {
            "pixel_values": pixels,
            "input_ids": self.input_ids[index],
            "groups": self.groups[index],
        }


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's share of each global batch of one epoch.

    An epoch's order depends on the seed and the epoch alone; global batch ``b`` is
    positions ``[b * G, (b + 1) * G)`` of it (``G = batch_size * num_processes``) and
    process ``r`` takes its ``r``-th slice. The last incomplete global batch is dropped.

    With ``weights`` (``method: balanced``) an epoch is instead as many rows drawn with
    replacement, row ``i`` with probability proportional to ``weights[i]``, from the same
    seeded generator: the same on every process and after a resume, and an epoch keeps
    its length, so the resume position (epoch, batch) means the same thing.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.batch_size, self.process_index, self.start_batch = batch_size, process_index, start_batch
        self.global_batch = batch_size * num_processes
        self.num_batches = num_samples // self.global_batch
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        if weights is None:
            self.order = torch.randperm(num_samples, generator=generator).tolist()
        else:
            if weights.shape != (num_samples,):
                raise ValueError(f"weights must have shape ({num_samples},), got {tuple(weights.shape)}")
            draws = self.num_batches * self.global_batch
            self.order = torch.multinomial(weights.double(), draws, replacement=True, generator=generator).tolist()

    def global_indices(self, batch: int) -> list[int]:
        """Dataset indices of global batch ``batch``, in process order."""
        return self.order[batch * self.global_batch : (batch + 1) * self.global_batch]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.process_index * self.batch_size
        for batch in range(self.start_batch, self.num_batches):
            yield self.global_indices(batch)[start : start + self.batch_size]
