"""Per-sample determinism: sample i's prior draw and noise depend only on (seed, i).

A job of N samples is the same set of samples whatever its batch size, the batch a sample lands
in, the rank that draws it or the number of ranks (docs/design.md, "Per-sample determinism"):

- the prior draw of sample i comes from its own torch.Generator, seeded by a hash of (seed, i)
  (numpy's SeedSequence, a well-mixed, documented hash);
- the sampler noise comes from one Philox key, a hash of (seed, "philox"), at counters that hold
  the sample index (fastint.table.ROW_STRIDE), so Sampler.sample(..., seed=philox_key(seed),
  first_index=i0) on samples [i0, i0 + B) gives each sample the noise it gets in any other batch.
"""
import numpy as np
import torch

_PHILOX_TAG = 0x5048494C  # "PHIL": keeps the Philox key apart from every sample's prior seed


def _words(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    seed %= 2**64
    return [seed & 0xFFFFFFFF, seed >> 32]


def sample_seed(seed, index):
    """The 63-bit torch seed of sample ``index``'s prior draw in the job seeded by ``seed``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    state = np.random.SeedSequence(_words(seed) + [int(index) & 0xFFFFFFFF, int(index) >> 32]).generate_state(
        1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def philox_key(seed):
    """The job's Philox key (an int in [0, 2**62)), the same on every rank and for every batch."""
    state = np.random.SeedSequence(_words(seed) + [_PHILOX_TAG]).generate_state(1, np.uint64)
    return int(state[0]) >> 2


def prior_draw(sde, data_shape, seed, first_index, count, device="cpu"):
    """The prior draws of samples [first_index, first_index + count): [count, *state_shape] on
    ``device``, each from its own generator (sample_seed), so equal for any batching."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    draws = [sde.prior_sample((1, *data_shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
             for i in range(first_index, first_index + count)]
    if not draws:
        return sde.prior_sample((1, *data_shape), generator=torch.Generator().manual_seed(0))[:0].to(device)
    return torch.cat(draws).to(device)
