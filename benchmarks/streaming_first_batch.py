#!/usr/bin/env python3
"""Seconds to read (bytes only, no decode) the first 32 samples of epoch 0 in EpochSampler's order with a cold
shard cache, then the whole epoch: MDS shards (data.dataset streaming) against the image folder they came from.

  python benchmarks/streaming_first_batch.py SHARDS FOLDER      # SHARDS: s3://bucket/path or a folder

Reading by index touches the shards in random order, so the first batch waits for nearly every shard.
"""
import sys
import tempfile
import time

from mnv_train import data

remote, folder = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as cache:
    for name, make in (('folder', lambda: data.TimmImages('folder', folder, 'train', True)),
                       ('shards', lambda: data.StreamedImages(remote, cache, 'train'))):
        source = make()
        order = [i for i, _ in data.EpochSampler(len(source), 0, 1, seed=0, micro_batch=32)]
        start = time.perf_counter()
        for i in order[:32]:
            source.read_bytes(i)
        first = time.perf_counter() - start
        for i in order[32:]:
            source.read_bytes(i)
        print(f'{name}: first 32 samples {first:.2f} s, whole epoch ({len(order)}) {time.perf_counter() - start:.2f} s')
