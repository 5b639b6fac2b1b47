"""LLaVA's modality-length-grouped sampler (upstream `--group_by_modality_length True`).

Each global batch (processes x accumulation x per-device batch records) is drawn from one modality
(image records or text-only records), its records sorted by length and split into per-device
micro-batches of similar total length; the leftover image and text records form one mixed last
batch. Lengths are LLaVA's: the word count of the conversation, negative for text-only records.
A port of llava/train/llava_trainer.py (get_modality_length_grouped_indices), with one seeded
generator for every shuffle (upstream draws the inner shuffles from the global RNG) so that the
order depends only on the seed and the epoch, identically on every process.
"""

from __future__ import annotations

from typing import Sequence

import torch


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split `indices` into `num_chunks` chunks of equal count and roughly equal total length."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator)
    mega = world_size * batch_size
    megabatches = [indices[i:i + mega].tolist() for i in range(0, len(lengths), mega)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    return [i for m in megabatches for chunk in split_to_even_chunks(m, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None) -> list[int]:
    if any(l == 0 for l in lengths):
        raise ValueError("modality lengths must be non-zero (sign = modality)")
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)  # as upstream, signs kept
    mm_idx, mm_len = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_idx, lang_len = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])
    mm = [mm_idx[i] for i in length_grouped_indices(mm_len, batch_size, world_size, generator)]
    lang = [lang_idx[i] for i in length_grouped_indices(lang_len, batch_size, world_size, generator)]
    mega = world_size * batch_size
    mm_mb = [mm[i:i + mega] for i in range(0, len(mm), mega)]
    lang_mb = [lang[i:i + mega] for i in range(0, len(lang), mega)]
    additional = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    order = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in order]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """`batch_size` is the per-device micro-batch, `world_size` processes x gradient accumulation
    (as upstream), so one megabatch is one optimizer step's global batch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.world_size, self.seed = list(lengths), batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g))
