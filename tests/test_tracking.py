"""Per-step curves (steps.csv) and the experiment trackers, W&B offline and MLflow on a local store, across a kill and
a resume."""
import csv
import os
import signal
import struct
from pathlib import Path

import pytest
from test_resume import start_training, wait_for

from mnv_train import checkpoint
from mnv_train.cli import train_main

from conftest import merge

LONGER = {'data': {'synthetic_train_size': 256}, 'train': {'checkpoint_every_steps': 3, 'log_every': 2}}


def steps_csv(run_dir):
    with open(run_dir / 'steps.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_steps_csv_has_a_row_per_log_point_with_fractional_epochs(write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    assert train_main(['--recipe', str(write_recipe({'optim': {'clip_grad': 1.0}})), '--output', str(out)]) == 0
    rows = steps_csv(out)
    assert [int(r['step']) for r in rows] == [2, 4, 6, 8]  # 4 steps an epoch, a log point every 2
    assert [float(r['epoch']) for r in rows] == [0.5, 1.0, 1.5, 2.0]
    assert float(rows[0]['lr']) > 0 and all(0 <= float(r['data_wait']) <= 1 for r in rows)
    assert all(float(r['grad_norm']) > 0 for r in rows) and all(r['loss_scale'] == '' for r in rows)
    assert 'the remaining 6 steps take about' in capsys.readouterr().out  # the estimate from the first steps
    assert (out / 'plots' / 'throughput.png').is_file()


def wandb_steps(run_dir) -> tuple[set, list[list]]:
    """(run ids, history steps of each offline W&B run folder under run_dir, oldest first), read from the .wandb log
    records (LevelDB log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    ids, runs = set(), []
    for path in sorted(run_dir.glob('wandb/offline-run-*/run-*.wandb')):
        ids.add(path.stem.removeprefix('run-'))
        steps = []
        runs.append(steps)
        data, position, chunk = path.read_bytes(), 7, b''
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack('<IHB', data[position:position + 7])
            chunk += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(chunk)
                if record.WhichOneof('record_type') == 'history':
                    steps.append(record.history.step.num)
                chunk = b''
    return ids, runs


def test_trackers_continue_the_same_runs_after_a_kill_and_log_no_step_twice(write_recipe, tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    pytest.importorskip('mlflow')
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    uri = f'sqlite:///{tmp_path}/mlflow.db'
    recipe = write_recipe(merge(LONGER, {'train': {'wandb': {'project': 'mnv-tests', 'tags': ['ci']},
                                                   'mlflow': {'experiment': 'mnv-tests', 'tracking_uri': uri}}}))
    out = tmp_path / 'run'
    process = start_training(recipe, out)
    wait_for(out / 'checkpoints' / 'step-00000012.pt.json', process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    ids = checkpoint.load(out / 'checkpoints' / 'step-00000012.pt')['trackers']
    assert set(ids) == {'wandb', 'mlflow'}
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    assert checkpoint.load(out / 'checkpoints' / 'last.pt')['trackers'] == ids  # the same runs, continued

    client = MlflowClient(uri)
    history = [m.step for m in client.get_metric_history(ids['mlflow'], 'train/loss')]
    assert history == sorted(set(history)) == list(range(2, 17, 2))  # every log point once
    assert client.get_run(ids['mlflow']).data.params['optim.lr'] == '0.002'  # the recipe as the run's config
    artifacts = {a.path for a in client.list_artifacts(ids['mlflow'])} | \
        {a.path for a in client.list_artifacts(ids['mlflow'], 'plots')}
    assert 'report.md' in artifacts and 'plots/top1.png' in artifacts

    run_ids, (killed, resumed) = wandb_steps(out)  # the killed process's folder, then the resumed one's
    assert run_ids == {ids['wandb']}
    # SIGKILL loses what W&B had not yet written (it writes offline records in the background), so only what
    # reached the file can be checked: the resumed run starts after it, and ends the run
    assert resumed and max(killed, default=0) < min(resumed) and resumed[-1] == 16
    assert len(killed + resumed) == len(set(killed + resumed))
    assert any(Path(p).name == 'report.md' for p in out.glob('wandb/offline-run-*/files/*'))

    assert [int(r['step']) for r in steps_csv(out)] == list(range(2, 17, 2))  # resume appends, never twice


def test_a_tracker_that_cannot_start_stops_the_run_before_it_trains(write_recipe, tmp_path, capsys):
    pytest.importorskip('mlflow')
    recipe = write_recipe({'train': {'mlflow': {'experiment': 'x', 'tracking_uri': 'nosuchscheme://nowhere'}}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: train.mlflow: MLflow did not start at nosuchscheme://nowhere') and len(
        err.splitlines()) == 1
    assert not (tmp_path / 'run' / 'checkpoints').exists()
    assert os.listdir(tmp_path / 'run') == ['recipe.yaml']  # announced, nothing trained


def test_tensorboard_shows_each_step_once_after_a_resume_the_checkpoint_step_included(write_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    recipe, out = write_recipe(LONGER), tmp_path / 'run'
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--max-steps', '12']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    events = EventAccumulator(str(out / 'tensorboard'), purge_orphaned_data=True)
    events.Reload()
    assert [event.step for event in events.Scalars('train/loss')] == list(range(2, 17, 2))
