"""benchmarks/gpu_check.sh and benchmarks/gpu_summary.py without a GPU: the CPU dry run (--tiny) goes through every
step and writes the JSON and summary that the GPU run will; without CUDA the script says in one line what it would
run; a spent budget skips steps and still leaves a summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'benchmarks'))
import gpu_summary  # noqa: E402  (a script folder, not a package)
import until_json  # noqa: E402

STEPS = ['images', 'pytest_cuda', 'bench_conv_small_224_host', 'timm_conv_small_224', 'bench_hybrid_large_384_eager',
         'fmnist', 'bench_hybrid_large_384_compiled']

# timm's train.py as far as the check reads it: one "Train:" log line per optimizer step, on stderr
FAKE_TIMM_TRAIN = '''
import argparse, sys
parser = argparse.ArgumentParser()
parser.add_argument('-b', type=int)
args, _ = parser.parse_known_args()
for step in range(12):
    print(f'Train: 0 [{step:>4d}/12 ({step * 8:>3d}%)]  Loss: 1.39 (1.39)  Time: 0.500s, {args.b / 0.5:>7.2f}/s  '
          f'(0.500s, {args.b / 0.5:>7.2f}/s)  LR: 1.000e-04  Data: 0.010 (0.010)', file=sys.stderr)
'''


def run_check(*args, timeout: int, **env):
    """gpu_check.sh as the GPU machine runs it, with every GPU hidden."""
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHON=sys.executable, **env)
    environment['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), environment.get('PYTHONPATH', '')) if p)
    return subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_check.sh'), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=environment, cwd=REPO)


def test_without_cuda_it_says_in_one_line_what_it_would_run_and_exits_0(tmp_path):
    result = run_check(timeout=120, GPU_CHECK_OUT=str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('gpu_check: no CUDA device here; would run: '), result.stdout
    assert 'pytest -m cuda tests/test_cuda.py' in lines[0] and 'mnv4_hybrid_large@384 bf16 compiled' in lines[0]
    assert not (tmp_path / 'out').exists()  # nothing ran, nothing was written


def test_by_default_the_check_leaves_out_what_does_not_fit_its_9_minutes_and_skip_empty_runs_all(tmp_path):
    default, every = (run_check(timeout=120, GPU_CHECK_OUT=str(tmp_path / 'out'), **env).stdout
                      for env in ({}, {'SKIP': ''}))
    run, left_out = default.split(' (left out: ')
    assert 'DALI' in run and 'compiled DALI' in run and 'eager' not in run and 'fmnist' not in run
    assert left_out.startswith('mnv_train.bench mnv4_hybrid_large@384 bf16 eager; train.py --recipe fmnist')
    assert 'bf16 compiled) in at most 540 s;' in left_out  # the host pipeline's compiled row
    assert 'left out' not in every and 'eager' in every and 'fmnist' in every


# a command that writes its JSON, then stays on with a worker of its own, as a compiled bench did
LINGERING = '''
import json, os, subprocess, sys, threading
worker = subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()'])
open(sys.argv[2], 'w').write(f'{os.getpid()} {worker.pid}')
open(sys.argv[1], 'w').write(json.dumps({'train': 1.0}))
threading.Event().wait()
'''


def gone(pid: int) -> bool:
    """Whether the process has ended (a zombie has: only its exit status is left)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except FileNotFoundError:
        return True


def test_a_command_that_lingers_after_writing_its_json_is_stopped_with_its_workers_and_exits_0(tmp_path, capfd):
    result, pids = tmp_path / 'bench.json', tmp_path / 'pids'
    command = [sys.executable, '-c', LINGERING, str(result), str(pids)]
    assert until_json.main([str(result), '--grace', '0', '--', *command]) == 0
    assert 'is written and the command still ran 0 s later: stopped it' in capfd.readouterr().err
    assert all(gone(int(pid)) for pid in pids.read_text().split())


def test_a_command_that_ends_by_itself_keeps_its_exit_status(tmp_path):
    assert until_json.main([str(tmp_path / 'x.json'), '--', sys.executable, '-c', 'raise SystemExit(3)']) == 3


def test_only_whole_json_written_since_the_start_counts_as_the_result(tmp_path):
    result = tmp_path / 'bench.json'
    result.write_text('{"train": 1')
    assert not until_json.written(result, since=0)  # half written
    result.write_text('{"train": 1.0}')
    assert until_json.written(result, since=0)
    os.utime(result, (0, 0))  # left by an earlier run
    assert not until_json.written(result, since=1)


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    """The whole check at toy sizes on the CPU, timm's train.py faked: (process, results folder)."""
    root = tmp_path_factory.mktemp('gpu_check')
    fake = root / 'train.py'
    fake.write_text(FAKE_TIMM_TRAIN)
    # a budget that only tests the flow: a spent budget is the case of test_a_spent_budget_skips_the_remaining_steps,
    # and a busy CI machine must not turn this run into that one (the default 300 s left it to the machine's load)
    result = run_check('--tiny', fake, timeout=3700, GPU_CHECK_OUT=str(root / 'out'), BUDGET_S='3600')
    return result, root / 'out'


def test_the_dry_run_goes_through_every_step_and_exits_0(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / 'gpu_check.json').read_text())
    assert report['schema'] == gpu_summary.SCHEMA
    assert [step['name'] for step in report['steps']] == STEPS
    for step in report['steps']:
        assert step['status'] == 'ok', (step, (out / 'logs' / f'{step["name"]}.log').read_text()[-3000:])
        assert step['seconds'] > 0 and step['limit_s'] > 0 and step['command']
    assert 'TORCHDYNAMO_DISABLE=1' in report['steps'][-1]['command']  # the dry run's compiled step says so
    assert 0 < report['elapsed_s'] <= report['budget_s']
    assert result.stdout.rstrip().splitlines()[-1].startswith(f'gpu_check: wrote {out}/gpu_check.json')


def test_the_dry_run_json_holds_every_figure(dry_run):
    _, out = dry_run
    report = json.loads((out / 'gpu_check.json').read_text())
    env = report['env']
    assert env['mode'] == 'tiny' and env['device'] == 'cpu' and env['cuda_available'] is False
    assert env['modules']['torch'][0].isdigit() and env['modules']['timm'][0].isdigit()
    tests = report['pytest']
    assert tests['source'] == 'junit' and tests['total'] == tests['skipped'] > 0  # no GPU: every CUDA test skips
    assert tests['passed'] == tests['failed'] == tests['errors'] == 0 and tests['failures'] == []
    assert sorted(report['bench']) == sorted(gpu_summary.BENCH_LABELS)
    for bench in report['bench'].values():
        assert all(bench[key] > 0 for key in ('model', 'input', 'train', 'train_vs_bound'))
        assert bench['rounds'] == 1 and bench['bound_by'] in ('model', 'input')
    assert report['timm']['conv_small_224']['train'] == pytest.approx(8.0)  # the fake's batch 4 every 0.5 s
    fmnist = report['fmnist']
    assert fmnist['status'] == 'ok' and fmnist['epochs'] == 1 and 0 <= fmnist['final_top1'] <= 100
    assert '--recipe fmnist_mnv4_conv_small' in fmnist['command'] and fmnist['seconds'] > 0
    targets = report['targets']
    assert len(targets) == len(gpu_summary.BENCH_LABELS) + 2
    assert all(isinstance(t['value'], float) and isinstance(t['met'], bool) for t in targets)
    timm_target = next(t for t in targets if 'timm' in t['name'])
    assert timm_target['value'] == pytest.approx(report['bench']['conv_small_224_host']['train'] / 8.0)
    hybrid = targets[-1]
    assert hybrid['threshold'] == gpu_summary.HYBRID_TARGET
    assert hybrid['value'] == max(report['bench'][k]['train'] for k in report['bench'] if k.startswith('hybrid'))


def test_the_dry_run_summary_has_the_targets_table(dry_run):
    result, out = dry_run
    summary = (out / 'summary.md').read_text()
    assert summary in result.stdout  # printed at the end as well
    assert 'Dry run (--tiny)' in summary
    assert '| target | value | threshold | verdict | detail |' in summary
    report = json.loads((out / 'gpu_check.json').read_text())
    for target in report['targets']:
        row = next(line for line in summary.splitlines() if line.startswith(f'| {target["name"]} |'))
        assert ('| met |' in row) == target['met'] and ('NOT met' in row) == (not target['met'])
    for label in gpu_summary.BENCH_LABELS.values():
        assert any(line.startswith(f'| {label} | 4 | 0 |') for line in summary.splitlines())
    assert f'0 passed, 0 failed, 0 errors, {report["pytest"]["skipped"]} skipped' in summary
    assert '| bench_hybrid_large_384_compiled | ok |' in summary


def test_a_spent_budget_skips_the_remaining_steps_and_still_writes_the_summary(tmp_path):
    result = run_check('--tiny', timeout=300, GPU_CHECK_OUT=str(tmp_path / 'out'), BUDGET_S='20')
    assert result.returncode == 1  # the check is incomplete
    report = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    statuses = {step['name']: step['status'] for step in report['steps']}
    assert statuses['pytest_cuda'] == statuses['bench_hybrid_large_384_compiled'] == 'over_budget'
    assert statuses['timm_conv_small_224'] == 'not_requested'
    assert all(t['met'] is None for t in report['targets'])
    summary = (tmp_path / 'out' / 'summary.md').read_text()
    assert 'not checked (no result)' in summary and 'over_budget (the 20 s budget is spent)' in summary


def test_pytest_counts_come_from_the_log_when_pytest_was_stopped_before_its_xml(tmp_path):
    (tmp_path / 'logs').mkdir()
    (tmp_path / 'logs' / 'pytest_cuda.log').write_text(
        'tests/test_cuda.py::test_a PASSED [ 14%]\ntests/test_cuda.py::test_b FAILED [ 28%]\n'
        'tests/test_cuda.py::test_c SKIPPED (needs a CUDA device) [ 42%]\n')
    counts = gpu_summary.pytest_counts(tmp_path)
    assert (counts['passed'], counts['failed'], counts['skipped'], counts['total']) == (1, 1, 1, 3)
    assert counts['source'] == 'log' and counts['failures'][0]['test'] == 'test_b'


def test_timeout_exit_codes_read_as_timed_out():
    assert [gpu_summary.step_status(rc) for rc in (0, 1, 2, 124, 137)] == ['ok', 'failed', 'failed', 'timed_out',
                                                                         'timed_out']


def test_steps_named_in_skip_are_not_run_and_do_not_fail_the_check(tmp_path):
    skipped = ('pytest_cuda bench_conv_small_224_host bench_hybrid_large_384_eager fmnist '
               'bench_hybrid_large_384_compiled')
    result = run_check('--tiny', timeout=300, GPU_CHECK_OUT=str(tmp_path / 'out'), SKIP=skipped)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    statuses = {step['name']: step['status'] for step in report['steps']}
    assert statuses == {'images': 'ok', 'timm_conv_small_224': 'not_requested',
                        **{name: 'not_requested' for name in skipped.split()}}
    assert not (tmp_path / 'out' / 'logs' / 'pytest_cuda.log').exists()
