"""The bookkeeping of benchmarks/gpu_check.sh: what each step ran and how it ended, and the results folder turned into
one JSON file and a Markdown summary with the three throughput targets checked.

  python benchmarks/gpu_summary.py env OUT --mode gpu|tiny --device cuda|cpu   # env.json: GPU, versions, modules
  python benchmarks/gpu_summary.py step OUT NAME RC SECONDS LIMIT -- COMMAND...   # steps/NN-NAME.json
  python benchmarks/gpu_summary.py skip OUT NAME over_budget|not_requested REASON -- COMMAND...   # a step not run
  python benchmarks/gpu_summary.py summarize OUT --budget S --elapsed S [--exit-status]   # gpu_check.json, summary.md

summarize --exit-status exits 1 when a step failed, timed out or was skipped for the budget.

OUT holds, besides: logs/NAME.log, bench/ID[.roundN].json (python -m mnv_train.bench --json), timm/ID[.roundN].json
(benchmarks/timm_rate.py), pytest.xml (JUnit) and cuda_measured.jsonl (tests/test_cuda.py's measured gaps),
fmnist/metrics.csv. Only the env command imports torch; the others run in a fraction of a second.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

SCHEMA = 'mnv-train/gpu-check/1'
END_TO_END_SHARE = 0.9  # end to end >= 90 % of min(model only, input pipeline)
HYBRID_TARGET = 2000.0  # img/s per H100, mnv4_hybrid_large @384 bf16, end to end
BENCH_LABELS = {  # bench id -> what it measures, in the order of the summary table
    'conv_small_224_host': 'mnv4_conv_small @224, host decode (PIL, RandAugment)',
    'hybrid_large_384_eager': 'mnv4_hybrid_large @384, bf16, channels_last, eager',
    'hybrid_large_384_compiled': 'mnv4_hybrid_large @384, bf16, channels_last, train.compile',
}
# the DALI rows (data.pipeline dali), run on a GPU and in a dry run with DALI_ROWS=1: labelled and checked only
# where they have a result, so that a check run without DALI reads as before
DALI_LABELS = {
    'conv_small_224_dali': 'mnv4_conv_small @224, DALI (decode, crop, flip, RandAugment)',
    'hybrid_large_384_dali': 'mnv4_hybrid_large @384, bf16, channels_last, train.compile, DALI (RandAugment m10)',
}
DALI_VS_HOST = 2.5  # conv_small @224 end to end with DALI >= 2.5 x the host pipeline's, side by side
DALI_MODEL_SHARE = 0.8  # ... and >= 80 % of the model alone
HYBRID_DALI_TARGET = 1700.0  # img/s per H200, mnv4_hybrid_large @384 bf16 end to end with DALI
TIMM_PAIRS = {'conv_small_224': 'conv_small_224_host'}  # timm id -> our bench id run just before it
BAD_STATUSES = ('failed', 'timed_out', 'over_budget')  # a step in one of these leaves the check incomplete
MODULES = ('torch', 'torchvision', 'timm', 'numpy', 'PIL', 'yaml', 'tqdm', 'tensorboard', 'safetensors', 'matplotlib',
           'pytest', 'pytest_timeout')


# ---------------------------------------------------------------------------------------------- env

def nvidia_smi() -> dict:
    query = 'name,memory.total,driver_version,power.limit,clocks.max.sm'
    try:
        lines = subprocess.run(['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'], capture_output=True,
                               text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return {'error': str(e)}
    return {'gpus': [dict(zip(query.split(','), (cell.strip() for cell in line.split(',')))) for line in lines]}


def module_versions() -> dict:
    versions = {}
    for name in MODULES:
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, '__version__', 'present'))
        except Exception as e:  # a missing or broken module is what this records, whatever it raises
            versions[name] = f'missing ({type(e).__name__}: {e})'
    return versions


def gib(count: int) -> float:
    return round(count / 2**30, 1)


def free_gib(path: str) -> Optional[float]:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return gib(stat.f_bavail * stat.f_frsize)


def write_env(out: Path, mode: str, device: str):
    env = {'mode': mode, 'device': device, 'date_utc': time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime()),
           'python': sys.version.split()[0], 'platform': platform.platform(), 'cpu_count': os.cpu_count(),
           'memory_gib': gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')),
           # loader workers hand batches over through /dev/shm: a container's small default makes them crash
           'dev_shm_free_gib': free_gib('/dev/shm'), 'tmp_free_gib': free_gib('/tmp'),
           'modules': module_versions(), 'nvidia_smi': nvidia_smi()}
    try:
        import torch  # here only: the other commands must not pay for importing it
        env['torch_cuda'] = torch.version.cuda
        env['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env['cuda_available'] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env['device_name'] = torch.cuda.get_device_name(0)
            env['device_count'] = torch.cuda.device_count()
    except ImportError:
        env['cuda_available'] = False
    (out / 'env.json').write_text(json.dumps(env, indent=1))
    missing = [name for name, version in env['modules'].items() if version.startswith('missing')]
    print(f'gpu_check: {env.get("device_name", device)}; torch {env["modules"]["torch"]}, timm '
          f'{env["modules"]["timm"]}' + (f'; missing modules: {", ".join(missing)}' if missing else ''))


# ---------------------------------------------------------------------------------------------- steps

def write_step(out: Path, name: str, record: dict):
    folder = out / 'steps'
    folder.mkdir(parents=True, exist_ok=True)
    number = len(list(folder.glob('*.json'))) + 1
    (folder / f'{number:02d}-{name}.json').write_text(json.dumps({'name': name, **record}, indent=1))


def step_status(rc: int) -> str:
    # timeout(1) exits 124 when it stopped the command, 137 when it had to kill it after the grace period
    return 'ok' if rc == 0 else 'timed_out' if rc in (124, 137) else 'failed'


def read_steps(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / 'steps').glob('*.json'))]


# ---------------------------------------------------------------------------------------------- results

def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rounds(folder: Path) -> dict[str, list[dict]]:
    """ID -> the results of its rounds, from ID.json / ID.roundN.json."""
    found: dict[str, list[dict]] = {}
    for path in sorted(folder.glob('*.json')):
        result = read_json(path)
        if result is not None:
            found.setdefault(path.name.split('.')[0], []).append(result)
    return found


def medians(runs: list[dict]) -> dict:
    """Median of each number over rounds; the other fields from the first round."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        numbers = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers:
            merged[key] = statistics.median(numbers)
    merged['rounds'] = len(runs)
    return merged


def pytest_counts(out: Path) -> dict:
    """Pass/fail counts from pytest's JUnit XML, or from the -v lines of its log when pytest was stopped first."""
    xml = out / 'pytest.xml'
    result = {'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0, 'failures': [], 'source': 'missing'}
    if xml.is_file():
        try:
            root = ElementTree.parse(xml).getroot()
        except ElementTree.ParseError:
            root = None
        if root is not None:
            for case in root.iter('testcase'):
                outcome = next((child for child in case if child.tag in ('failure', 'error', 'skipped')), None)
                kind = {'failure': 'failed', 'error': 'errors', 'skipped': 'skipped'}.get(getattr(outcome, 'tag', ''),
                                                                                           'passed')
                result[kind] += 1
                if kind in ('failed', 'errors'):
                    message = (outcome.get('message') or outcome.text or '').strip().splitlines()
                    first = message[0][:300] if message else ''
                    result['failures'].append({'test': case.get('name'), 'message': first})
            result['source'] = 'junit'
    if result['source'] == 'missing':
        log = out / 'logs' / 'pytest_cuda.log'
        text = log.read_text(errors='replace') if log.is_file() else ''
        for name, outcome in re.findall(r'^\S*::(\S+) (PASSED|FAILED|SKIPPED|ERROR)', text, re.M):
            kind = {'PASSED': 'passed', 'FAILED': 'failed', 'SKIPPED': 'skipped', 'ERROR': 'errors'}[outcome]
            result[kind] += 1
            if kind in ('failed', 'errors'):
                result['failures'].append({'test': name, 'message': 'see logs/pytest_cuda.log'})
        result['source'] = 'log' if text else 'missing'
    result['total'] = result['passed'] + result['failed'] + result['errors'] + result['skipped']
    measured = out / 'cuda_measured.jsonl'
    result['measured'] = ([json.loads(line) for line in measured.read_text().splitlines() if line.strip()]
                          if measured.is_file() else [])
    return result


def number(text: Optional[str]) -> Optional[float]:
    return float(text) if text not in (None, '') else None


def fmnist_result(out: Path, steps: list[dict]) -> dict:
    step = next((s for s in steps if s['name'] == 'fmnist'), None)
    result = {'status': step['status'] if step else 'not run', 'command': step['command'] if step else None,
              'seconds': step.get('seconds') if step else None}
    try:
        with open(out / 'fmnist' / 'metrics.csv', newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    if rows:
        last = rows[-1]
        result['epochs'] = len(rows)
        result.update({key: number(last.get(key)) for key in ('top1', 'ema_top1', 'train_loss')})
        result['final_top1'] = result['ema_top1'] if result['ema_top1'] is not None else result['top1']
    return result


def target(name: str, value: Optional[float], threshold: float, detail: str) -> dict:
    return {'name': name, 'value': value, 'threshold': threshold,
            'met': None if value is None else bool(value >= threshold), 'detail': detail}


def targets(bench: dict, timm: dict) -> list[dict]:
    """The three throughput targets; a figure that is missing (its step failed) leaves the target unchecked."""
    checked = []
    for bench_id, label in BENCH_LABELS.items():
        result = bench.get(bench_id, {})
        checked.append(target(f'end to end >= {END_TO_END_SHARE:.0%} of min(model only, input pipeline): {label}',
                              result.get('train_vs_bound'), END_TO_END_SHARE,
                              f'bound by the {result["bound_by"]}' if 'bound_by' in result else 'no result'))
    for timm_id, bench_id in TIMM_PAIRS.items():
        ours, theirs = bench.get(bench_id, {}).get('train'), timm.get(timm_id, {}).get('train')
        ratio = ours / theirs if ours and theirs else None
        checked.append(target(f'at least as fast as timm train.py side by side: {BENCH_LABELS[bench_id]}', ratio, 1.0,
                              f'mnv-train {ours:.1f} img/s, timm {theirs:.1f} img/s (median over rounds)'
                              if ratio is not None else 'no result for one side'))
    checked += dali_targets(bench)
    hybrid = {k: v for k, v in bench.items() if k.startswith('hybrid_large_384') and 'train' in v}
    best = max(hybrid, key=lambda k: hybrid[k]['train'], default=None)
    per_device = hybrid[best]['train'] / hybrid[best].get('world_size', 1) if best else None
    checked.append(target(f'mnv4_hybrid_large @384 bf16 end to end >= {HYBRID_TARGET:.0f} img/s per device',
                          per_device, HYBRID_TARGET,
                          f'best: {best} (model only {hybrid[best]["model"]:.0f} img/s)' if best else 'no result'))
    return checked


def dali_targets(bench: dict) -> list[dict]:
    """The DALI rows' targets, where those rows ran: against the host pipeline, the model alone, Hybrid-L's rate."""
    checked = []
    dali, host = bench.get('conv_small_224_dali'), bench.get('conv_small_224_host', {})
    if dali and 'train' in dali:
        ratio = dali['train'] / host['train'] if host.get('train') else None
        checked.append(target(f'DALI end to end >= {DALI_VS_HOST:g} x the host pipeline\'s: mnv4_conv_small @224',
                              ratio, DALI_VS_HOST, f'DALI {dali["train"]:.1f} img/s, host {host.get("train", 0):.1f} '
                              f'img/s, side by side'))
        checked.append(target(f'DALI end to end >= {DALI_MODEL_SHARE:.0%} of model only: mnv4_conv_small @224',
                              dali['train'] / dali['model'], DALI_MODEL_SHARE, f'bound by the {dali["bound_by"]}'))
    hybrid = bench.get('hybrid_large_384_dali')
    if hybrid and 'train' in hybrid:
        checked.append(target(f'DALI end to end >= {HYBRID_DALI_TARGET:.0f} img/s per device: mnv4_hybrid_large '
                              f'@384 bf16 compiled', hybrid['train'] / hybrid.get('world_size', 1), HYBRID_DALI_TARGET,
                              f'model only {hybrid["model"]:.0f} img/s, bound by the {hybrid["bound_by"]}'))
    return checked


def bound_note(bench: dict) -> str:
    """Which bound a row is under: the input or the model, and on a CPU the two sharing the cores."""
    if 'bound_by' not in bench:
        return ''
    note = f'{bench["bound_by"]} ({cell(min(bench["model"], bench["input"]))} img/s)'
    if 'shared_cores_bound' in bench:
        note += f'; sharing the CPU: {cell(bench["shared_cores_bound"])} img/s'
    return note


def collect(out: Path, budget: Optional[float], elapsed: Optional[float]) -> dict:
    steps = read_steps(out)
    bench = {k: medians(v) for k, v in rounds(out / 'bench').items()}
    timm = {k: medians(v) for k, v in rounds(out / 'timm').items()}
    return {'schema': SCHEMA, 'env': read_json(out / 'env.json') or {}, 'budget_s': budget, 'elapsed_s': elapsed,
            'steps': steps, 'pytest': pytest_counts(out), 'bench': bench, 'timm': timm,
            'timm_rounds': {k: [r.get('train') for r in v] for k, v in rounds(out / 'timm').items()},
            'bench_rounds': {k: [r.get('train') for r in v] for k, v in rounds(out / 'bench').items()},
            'fmnist': fmnist_result(out, steps), 'targets': targets(bench, timm)}


# ---------------------------------------------------------------------------------------------- summary.md

def cell(value, digits: str = '.1f') -> str:
    return '' if value is None else f'{value:{digits}}'


def verdict(met: Optional[bool]) -> str:
    return {True: 'met', False: '**NOT met**', None: 'not checked (no result)'}[met]


def header(result: dict) -> list[str]:
    env = result['env']
    gpu = env.get('device_name') or ', '.join(g.get('name', '?') for g in env.get('nvidia_smi', {}).get('gpus', []))
    lines = ['# gpu_check results', '']
    if env.get('mode') == 'tiny':
        lines += ['**Dry run (--tiny) on the CPU: toy sizes; the figures say nothing about a GPU.**', '']
    modules = env.get('modules', {})
    return lines + [
        f'- device: {gpu or env.get("device", "?")}; {env.get("date_utc", "")} UTC',
        f'- torch {modules.get("torch")}, torchvision {modules.get("torchvision")}, timm {modules.get("timm")}, '
        f'Python {env.get("python")}, CUDA {env.get("torch_cuda")}, cuDNN {env.get("cudnn")}, '
        f'{env.get("cpu_count")} CPU cores, {env.get("memory_gib")} GiB memory, '
        f'{env.get("dev_shm_free_gib")} GiB free in /dev/shm',
        f'- wall time {cell(result["elapsed_s"], ".0f")} s of a {cell(result["budget_s"], ".0f")} s budget', '']


def targets_table(result: dict) -> list[str]:
    lines = ['## Targets', '', '| target | value | threshold | verdict | detail |', '|---|---|---|---|---|']
    for t in result['targets']:
        lines.append(f'| {t["name"]} | {cell(t["value"], ".3g")} | {t["threshold"]:g} | {verdict(t["met"])} | '
                     f'{t["detail"]} |')
    return lines + ['']


def throughput_table(result: dict) -> list[str]:
    lines = ['## Throughput (img/s, median over rounds)', '',
             '| benchmark | batch | workers | model only | input pipeline | end to end | end to end / bound | rounds | '
             'bound by |', '|---|---|---|---|---|---|---|---|---|']
    dali = {k: v for k, v in DALI_LABELS.items() if k in result['bench']}
    for bench_id, label in {**BENCH_LABELS, **dali}.items():
        b = result['bench'].get(bench_id)
        if b:
            lines.append(f'| {label} | {b.get("per_device_batch")} | {b.get("workers")} | {cell(b.get("model"))} | '
                         f'{cell(b.get("input"))} | {cell(b.get("train"))} | {cell(b.get("train_vs_bound"), ".0%")} | '
                         f'{b["rounds"]} | {bound_note(b)} |')
        else:
            lines.append(f'| {label} | | | | | | | no result | |')
    for timm_id, runs in result['timm_rounds'].items():
        t = result['timm'][timm_id]
        lines.append(f'| timm train.py, the values of `{timm_id}` | | | | | {cell(t.get("train"))} | | '
                     f'{t["rounds"]} | |')
        ours = result['bench_rounds'].get(TIMM_PAIRS.get(timm_id, ''), [])
        pairs = ', '.join(f'{cell(a)} / {cell(b)}' for a, b in zip(ours, runs))
        lines.append(f'| per round, mnv-train / timm: {pairs} | | | | | | | | |')
    return lines + ['']


def tests_section(result: dict) -> list[str]:
    p = result['pytest']
    lines = ['## CUDA tests (`pytest -m cuda tests/test_cuda.py`)', '',
             f'{p["passed"]} passed, {p["failed"]} failed, {p["errors"]} errors, {p["skipped"]} skipped '
             f'(from {p["source"]})', '']
    lines += [f'- FAILED {f["test"]}: {f["message"]}' for f in p['failures']]
    if p['measured']:
        lines += ['', '| test | measured | value | bound |', '|---|---|---|---|']
        lines += [f'| {m["test"]} | {m["name"]} | {m["value"]:.4g} | {m["bound"]} |' for m in p['measured']]
    return lines + ['']


def fmnist_and_steps(result: dict) -> list[str]:
    f = result['fmnist']
    lines = ['## Fashion-MNIST quickstart', '',
             f'- {f["status"]}: last epoch top-1 {cell(f.get("ema_top1"), ".2f")} % (EMA weights), '
             f'{cell(f.get("top1"), ".2f")} % (raw weights), after {f.get("epochs", 0)} epoch(s)',
             f'- wall time {cell(f.get("seconds"), ".0f")} s, start-up, evaluation and report included',
             f'- command: `{f["command"]}`' if f['command'] else '- command: not run', '']
    lines += ['## Steps', '', '| step | status | seconds | limit (s) | command |', '|---|---|---|---|---|']
    for s in result['steps']:
        status = s['status'] + (f' ({s["reason"]})' if s.get('reason') else '')
        lines.append(f'| {s["name"]} | {status} | {cell(s.get("seconds"))} | {cell(s.get("limit_s"), ".0f")} | '
                     f'`{s["command"]}` |')
    return lines


def markdown(result: dict) -> str:
    return '\n'.join(header(result) + targets_table(result) + throughput_table(result) + tests_section(result) +
                     fmnist_and_steps(result)) + '\n'


# ---------------------------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='action', required=True)
    env = sub.add_parser('env')
    env.add_argument('out', type=Path)
    env.add_argument('--mode', choices=['gpu', 'tiny'], required=True)
    env.add_argument('--device', required=True)
    step = sub.add_parser('step')
    for name, kind in (('out', Path), ('name', str), ('rc', int), ('seconds', float), ('limit', float)):
        step.add_argument(name, type=kind)
    step.add_argument('command', nargs=argparse.REMAINDER)
    skip = sub.add_parser('skip')
    skip.add_argument('out', type=Path)
    skip.add_argument('name')
    skip.add_argument('status', choices=['over_budget', 'not_requested'])
    skip.add_argument('reason')
    skip.add_argument('command', nargs=argparse.REMAINDER)
    summarize = sub.add_parser('summarize')
    summarize.add_argument('out', type=Path)
    summarize.add_argument('--budget', type=float)
    summarize.add_argument('--elapsed', type=float)
    summarize.add_argument('--exit-status', action='store_true', help='exit 1 if a step failed, timed out or was '
                           'skipped for the budget')
    return p


def shell_line(command: list[str]) -> str:
    return ' '.join(shlex.quote(c) for c in (command[1:] if command[:1] == ['--'] else command))


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.action == 'env':
        write_env(args.out, args.mode, args.device)
    elif args.action == 'step':
        write_step(args.out, args.name, {'command': shell_line(args.command), 'rc': args.rc, 'seconds': args.seconds,
                                         'limit_s': args.limit, 'status': step_status(args.rc),
                                         'log': f'logs/{args.name}.log'})
    elif args.action == 'skip':
        write_step(args.out, args.name, {'command': shell_line(args.command), 'rc': None, 'seconds': 0.0,
                                         'limit_s': None, 'status': args.status, 'reason': args.reason})
    else:
        result = collect(args.out, args.budget, args.elapsed)
        (args.out / 'gpu_check.json').write_text(json.dumps(result, indent=1))
        (args.out / 'summary.md').write_text(markdown(result))
        if args.exit_status and any(s['status'] in BAD_STATUSES for s in result['steps']):
            return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
