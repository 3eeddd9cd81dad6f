"""report.md and its plots, from a finished run and from run folders written by hand."""
import csv
import json
import math
import subprocess
import sys

import pytest

from mnv_train import recipe as recipes
from mnv_train.cli import train_main
from mnv_train.errors import UserError
from mnv_train.report import fit_hint, main, write_report

from conftest import REPO, TINY, merge

PLOTS = ('loss.png', 'lr.png', 'top1.png', 'gap.png')
STEP_PLOTS = PLOTS + ('throughput.png',)  # from steps.csv, which training writes


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 2000, path


def table(report: str) -> list[list[str]]:
    """The per-epoch table of report.md, header first, as cells."""
    lines = [line for line in report.splitlines() if line.startswith('| ')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines]


def write_run(folder, rows, recipe_changes=None, manifest=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'recipe.yaml').write_text(recipes.from_dict(merge(TINY, recipe_changes or {})).to_yaml())
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(folder / 'metrics.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if manifest is not None:
        (folder / 'checkpoints').mkdir()
        (folder / 'checkpoints' / 'last.pt.json').write_text(json.dumps(manifest))
    return folder


def row(epoch, step, train_loss, loss, top1, ema_top1, **extra):
    return {'epoch': epoch, 'step': step, 'lr': 0.001, 'train_loss': train_loss, 'top1': top1, 'top5': 90.0,
            'loss': loss, 'ema_top1': ema_top1, 'ema_top5': 90.0, 'ema_loss': loss, **extra}


def test_training_ends_with_a_report_that_shows_every_eval_size(write_recipe, tmp_path):
    out = tmp_path / 'run'
    recipe = write_recipe({'data': {'synthetic_train_size': 32, 'synthetic_val_size': 16, 'extra_evals': [[40, 1.0]]},
                           'train': {'batch_size': 32}})
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
    report = (out / 'report.md').read_text()
    header = table(report)[0]
    assert header[:7] == ['epoch', 'step', 'lr', 'train loss', 'eval loss', 'train top1', 'gap']
    assert header[7:] == ['top1', 'top1@40', 'ema_top1', 'ema_top1@40', 'EMA']
    assert '- best top1@40:' in report
    first = table(report)[1]
    assert float(first[6]) == pytest.approx(float(first[5]) - float(first[7]), abs=0.011)  # train top1 - top1
    for name in STEP_PLOTS:
        assert_png(out / 'plots' / name)
        assert f'](plots/{name})' in report


def test_the_eval_loss_without_the_images_with_wild_logits_is_shown_beside_the_mean(tmp_path):
    rows = [row(0, 4, 1.4, 0.9, 40.0, 25.0, wild_logits=0, wild_loss=0.0, ema_wild_logits=0, ema_wild_loss=0.0),
            row(1, 8, 1.2, 57.4, 55.0, 30.0, wild_logits=4, wild_loss=57.1, ema_wild_logits=0, ema_wild_loss=0.0)]
    folder = write_run(tmp_path / 'run', rows)
    report = write_report(folder).read_text()
    assert [line[4] for line in table(report)[1:]] == ['0.9000', '57.4000 (4 wild: 0.3000)']
    assert 'N images had a logit beyond 1000' in report
    assert_png(folder / 'plots' / 'loss.png')
    folder = write_run(tmp_path / 'tame', rows[:1])  # none: neither the note nor the cell
    report = write_report(folder).read_text()
    assert 'wild' not in report and table(report)[1][4] == '0.9000'


def test_report_marks_ema_warming_up_and_reads_the_run_global_batch(tmp_path):
    rows = [row(0, 4, 1.4, 1.3, 40.0, 25.0), row(1, 8, 1.2, 1.1, 55.0, 30.0), row(2, 80, 1.0, 0.9, 70.0, 66.0)]
    folder = write_run(tmp_path / 'run', rows, {'ema': {'decay': 0.99, 'warmup': False}})
    warm = 1 + math.ceil(math.log(0.5) / math.log(0.99))  # 70: the EMA copies the model at step 1, then averages
    assert rows[1]['step'] < warm < rows[2]['step']
    cells = table(write_report(folder).read_text())
    assert [line[-1] for line in cells[1:]] == ['warming up', 'warming up', '']
    assert cells[1][5:7] == ['', '']  # no training-subset top-1 in these rows: no gap

    # run at global batch 128 instead of the recipe's 32: decay 0.99 ** 4 per step, half-life 17.3 steps
    rows = [row(0, 4, 1.4, 1.3, 40.0, 25.0), row(1, 20, 1.2, 1.1, 55.0, 30.0)]
    folder = write_run(tmp_path / 'bigger', rows, {'ema': {'decay': 0.99, 'warmup': False}},
                       manifest={'step': 20, 'samples_seen': 20 * 128})
    report = write_report(folder).read_text()
    assert 'at global batch 128' in report
    assert [line[-1] for line in table(report)[1:]] == ['warming up', '']


def fitted(val, train):
    """Evaluated epochs with these validation and training-subset top-1 values."""
    return [row(e, 4 * (e + 1), 1.4 - 0.1 * e, 1.0, v, v, train_top1=t) for e, (v, t) in enumerate(zip(val, train))]


def test_fit_hint_compares_training_and_validation_accuracy_measured_alike():
    overfit = fitted([70.0, 78.0, 79.0, 78.5], [72.0, 84.0, 90.0, 95.0])
    hint = fit_hint(overfit)
    assert hint.startswith('overfitting: training-subset top-1 95.00 against validation 78.50 at epoch 4: a gap '
                           'of +16.50 points, +2.00 at epoch 1')
    assert 'weight decay, augmentation, label smoothing' in hint
    underfit = fitted([60.0, 70.0, 75.0], [59.5, 70.2, 75.4])  # as good on new images as on its own
    hint = fit_hint(underfit)
    assert hint.startswith('underfitting:') and 'validation top-1 still rises' in hint
    assert 'regularise less' in hint and 'larger crop scale' in hint
    good = fitted([70.0, 80.0, 85.0], [72.0, 83.0, 88.0])
    assert fit_hint(good).startswith('a good fit: training-subset top-1 88.00 against validation 85.00')
    # the old hint called a healthy short run "more regularized than it needs" from losses measured differently
    healthy = [row(0, 4, 1.4, 0.5, 85.0, 85.0, train_top1=87.5), row(1, 8, 1.2, 0.45, 87.0, 87.0, train_top1=90.0)]
    assert fit_hint(healthy).startswith('a good fit')
    assert fit_hint(good[:1]).startswith('too few evaluations with a training-subset top-1')


def test_report_cli_on_a_run_folder(tmp_path, capsys):
    folder = write_run(tmp_path / 'run', [row(0, 4, 1.4, 1.3, 40.0, 25.0), row(1, 8, 1.2, 1.1, 55.0, 30.0)])
    assert main([str(folder)]) == 0
    assert f'report: {folder / "report.md"}' in capsys.readouterr().out
    for name in PLOTS:
        assert_png(folder / 'plots' / name)


@pytest.mark.parametrize('metrics, message', [
    (None, 'metrics.csv not found'),
    ('', 'holds no epochs yet'),
    ('epoch,step,lr,train_loss\n', 'holds no epochs yet'),
    ('epoch,step,lr,train_loss\n0,4,fast,1.0\n', "column 'lr' holds 'fast', not a number"),
])
def test_missing_or_broken_metrics_are_one_line_errors(tmp_path, metrics, message):
    folder = write_run(tmp_path / 'run', [row(0, 4, 1.4, 1.3, 40.0, 25.0)])
    if metrics is None:
        (folder / 'metrics.csv').unlink()
    else:
        (folder / 'metrics.csv').write_text(metrics)
    with pytest.raises(UserError, match=message):
        write_report(folder)


def test_python_dash_m_report_fails_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'mnv_train.report', str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr == f'error: {tmp_path / "metrics.csv"} not found: not a run folder, or no epoch has ' \
                            f'finished yet\n'


def test_an_unreadable_suite_result_is_named_and_left_out_of_the_report(tmp_path, capfd):
    from mnv_train.report import suite_sections
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    (folder / 'last.suite-ema-32-1.json').write_text(json.dumps({
        'checkpoint': str(folder / 'last.pt'), 'weights': 'ema', 'img_size': 32, 'crop_pct': 1.0,
        'sets': [{'set': 'imagenet', 'images': 10, 'top1': 40.0, 'top5': 80.0}]}))
    (folder / 'best.suite-raw-32-1.json').write_text('{"checkpoint": ')  # cut short
    lines = suite_sections(tmp_path)  # the end of a finished run: a warning, not an error
    assert '## Evaluation suite: last.pt, ema weights, 32 px, crop 1' in lines
    assert '| imagenet | 10 | 40.00 | 80.00 |  |' in lines
    assert not any('best.pt' in line for line in lines)
    warnings = capfd.readouterr().err.splitlines()
    assert len(warnings) == 1 and 'best.suite-raw-32-1.json: not a readable evaluation suite result' in warnings[0]
