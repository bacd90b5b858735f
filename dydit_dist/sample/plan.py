"""What a sampling job makes: N samples, their conditions and seeds, cut into shards of S samples.

Every sample is a function of its index k alone:
- class-conditional: class `k % num_classes` (50,000 samples over 1,000 classes give 50 per class,
  and every prefix of the order is as balanced as it can be);
- text-to-image: prompt `k % P` of a prompts file of P prompts, recorded with its index;
- randomness: one `torch.Generator` per sample, seeded by `sample_seed(seed, k)` (numpy's
  SeedSequence of the pair, so seeds of different (seed, k) never collide by arithmetic). It draws
  the initial noise and every stochastic step's noise of that sample and nothing else, so a sample
  does not depend on the worker, batch or retry that made it.

Shard i holds samples [i * S, min((i + 1) * S, N)), written as `shard-{i:06d}.tar`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from dydit_dist import storage
from dydit_dist.sample.manifest import SamplesError
from dydit_dist.shardset import shard_name


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` holds the samples `start <= k < stop`."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


def plan_shards(num_samples: int, shard_size: int) -> list[ShardSpec]:
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples={num_samples} and shard_size={shard_size} must be positive")
    return [ShardSpec(i, start, min(start + shard_size, num_samples))
            for i, start in enumerate(range(0, num_samples, shard_size))]


def class_label(index: int, num_classes: int, labels: str = "balanced", seed: int = 0) -> int:
    """The class of sample `index` (`sample.labels`): balanced, index % num_classes; random, a uniform draw
    of its own stream keyed by (seed, index), independent of the batch and of the sample's noise."""
    if labels == "balanced":
        return index % num_classes
    if labels != "random":
        raise ValueError(f"sample.labels={labels!r}: expected random or balanced")
    return int(np.random.default_rng([seed, index, _LABEL_STREAM]).integers(num_classes))


_LABEL_STREAM = 0x6C6162656C  # "label": the labels' stream, apart from the noise's SeedSequence([seed, index])


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample `index` of a job seeded with `seed`."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def sample_generators(seed: int, indices, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One freshly seeded generator per sample index (on the CPU by default, so that a sample's noise
    is the same on every kind of device)."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, k)) for k in indices]


def load_prompts(url: str) -> list[str]:
    """Prompts of a text-to-image job: a `.txt` file (one prompt per line) or a `.jsonl` file (one
    object per line with a "prompt" or "caption" field). Empty prompts are errors naming the line."""
    return parse_prompts(url, storage.read_bytes(url))


class PromptsError(SamplesError):
    """A prompts file that is not one (the job's input error, exit 2)."""


def parse_prompts(url: str, data: bytes) -> list[str]:
    """`load_prompts` of the bytes `data` read from `url`; PromptsError naming the file (and line)."""
    try:
        return _parse_prompts(url, data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PromptsError(f"sample.prompts={url}: not UTF-8 text ({err})") from None
    except ValueError as err:
        raise PromptsError(f"sample.prompts={err}") from None


def _parse_prompts(url: str, text: str) -> list[str]:
    jsonl = url.lower().endswith(".jsonl")
    if not jsonl and not url.lower().endswith(".txt"):  # a .json array or a captions .csv read as lines is text
        raise ValueError(f"{url}: expected a .txt file (one prompt per line) or a .jsonl file (a \"prompt\" or "
                         "\"caption\" field per line)")
    lines = text.splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        if jsonl:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{url}:{number}: not a JSON object ({err})") from None
            prompt = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                raise ValueError(f"{url}:{number}: expected a \"prompt\" or \"caption\" string field")
        else:
            prompt = line
        if not prompt.strip():
            raise ValueError(f"{url}:{number}: empty prompt (one prompt per line, no blank lines)")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{url}: no prompts found")
    return prompts


def prompt_index(index: int, num_prompts: int) -> int:
    return index % num_prompts
