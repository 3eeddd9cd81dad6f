"""img/s of timm's train.py from its per-step log lines (--log-interval 1) on stdin, as JSON on stdout.

Times the same steps bench.py does: --skip warm-up steps, then --steps steps, total images / total seconds.
"""
import argparse
import json
import re
import sys

parser = argparse.ArgumentParser()
parser.add_argument('--skip', type=int, default=3)
parser.add_argument('--steps', type=int, default=40)
args = parser.parse_args()
# "Time: 0.373s,   85.75/s" -> seconds and img/s of one step
steps = [(float(t), float(r)) for t, r in re.findall(r'Time: ([\d.]+)s,\s+([\d.]+)/s', sys.stdin.read())]
timed = steps[args.skip:args.skip + args.steps]
if len(timed) < args.steps:
    sys.exit(f'timm_rate: {len(timed)} timed steps in the log, expected {args.steps}')
images = sum(seconds * rate for seconds, rate in timed)
json.dump({'train': images / sum(seconds for seconds, _ in timed), 'steps': len(timed),
           'source': "timm train.py per-step log lines"}, sys.stdout, indent=1)
