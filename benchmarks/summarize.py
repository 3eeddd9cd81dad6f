"""Markdown table of benchmarks/results/*.json: median over rounds of each figure."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

folder = Path(sys.argv[1])
figures = defaultdict(lambda: defaultdict(list))
for path in sorted(folder.glob('*.json')):
    name = path.name.split('.')[0]
    for key, value in json.loads(path.read_text()).items():
        if isinstance(value, float):
            figures[name][key].append(value)
keys = ['model', 'input', 'train', 'train_vs_bound', 'shared_cores_bound', 'train_vs_shared_cores_bound']
print('| benchmark | rounds | ' + ' | '.join(keys) + ' |')
print('|---' * (len(keys) + 2) + '|')
for name, values in figures.items():
    cells = [f'{statistics.median(values[k]):.3g}' if values.get(k) else '' for k in keys]
    print(f'| {name} | {max(len(v) for v in values.values())} | ' + ' | '.join(cells) + ' |')
