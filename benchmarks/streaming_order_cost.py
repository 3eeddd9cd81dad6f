#!/usr/bin/env python3
"""Shards that the first optimizer step of an epoch needs, in data.stream_order shards (StreamingDataset's own
order, computed by its own partition and shuffle functions) and in samples (a uniform permutation), for a split of
given size: what the first batch waits for. No data is read.

  python benchmarks/streaming_order_cost.py [SAMPLES PER_SHARD GLOBAL_BATCH CANONICAL_NODES BLOCK_SIZE]

Defaults: ImageNet's 1,281,167 training images in 64 MB shards (~580 images of ~110 kB), global batch 4096, and
the recipe defaults data.num_canonical_nodes 64, data.shuffle_block_size 4096 (shuffle py1e).
"""
import sys

import numpy as np
from streaming.base.partition import get_partitions
from streaming.base.shuffle import get_shuffle

samples, per_shard, batch, canonical, block = (list(map(int, sys.argv[1:6])) if len(sys.argv) > 5
                                               else [1_281_167, 580, 4096, 64, 4096])
sizes = np.full(-(-samples // per_shard), per_shard, np.int64)
sizes[-1] = samples - per_shard * (len(sizes) - 1)
shard_of = np.repeat(np.arange(len(sizes)), sizes)
ids = get_partitions('orig', samples, canonical, 1, 1, 1, 1).flatten()  # one node, rank and worker: the sequence
order = get_shuffle('py1e', sizes, canonical, 0, 0, block)[ids]
steps = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
shards_per_step = [len(np.unique(shard_of[step])) for step in steps]
permuted = np.random.default_rng(0).permutation(samples)[:batch]
print(f'{samples} samples in {len(sizes)} shards of {per_shard}, global batch {batch}, {canonical} canonical nodes, '
      f'py1e block {block}:')
print(f'  shards order: the first step needs {shards_per_step[0]} shards; a step needs {min(shards_per_step)} to '
      f'{max(shards_per_step)}')
print(f'  samples order: the first step needs {len(np.unique(shard_of[permuted]))} shards')
