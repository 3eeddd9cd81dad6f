"""Experiment trackers: Weights & Biases and MLflow, behind the run's one metrics log.

Each logs the resolved recipe as its config, the per-step scalars at log points and the per-epoch metrics, and
attaches report.md and the plots at the end. On resume it continues the same tracker run: the run ids travel in
every checkpoint. Steps already logged before a crash are not logged twice: trackers.json in the run folder
keeps the last step each tracker received, and a resumed run, which recomputes those steps exactly, skips them.
Rank 0 alone logs. A tracker that cannot start (not installed, a bad URI) stops the run before it trains.

wandb and mlflow are optional extras (pip install -e '.[wandb]' / '.[mlflow]'), imported only when a recipe asks
for them. MLflow stores into a SQLite database and an artifact folder inside the run folder unless
MLFLOW_TRACKING_URI or train.mlflow.tracking_uri points elsewhere (MLflow 3 refuses its plain-file store).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from .errors import UserError
from .recipe import MlflowConfig, WandbConfig, flatten

STATE_FILE = 'trackers.json'


class Tracker:
    name = ''

    def log(self, step: int, values: dict):
        raise NotImplementedError

    def attach(self, paths: list[Path]):
        raise NotImplementedError

    def finish(self):
        raise NotImplementedError


class WandbTracker(Tracker):
    name = 'wandb'

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        try:
            import wandb  # optional extra
        except ImportError:
            raise UserError('train.wandb is set but wandb is not installed: pip install -e \'.[wandb]\'') from None
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, tags=list(cfg.tags), config=config,
                                  dir=str(run_dir), id=run_id or uuid.uuid4().hex[:8], resume='allow',
                                  name=run_dir.name)  # WANDB_MODE=offline is honoured by wandb itself
        except Exception as e:  # wandb reports a bad entity, project or key in its own error types
            raise UserError(f'train.wandb: W&B did not start ({str(e).splitlines()[0][:160]})') from None
        self.id = self.run.id

    def log(self, step: int, values: dict):
        self.run.log(values, step=step)

    def attach(self, paths: list[Path]):
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent.parent if path.parent.name == 'plots'
                                                   else path.parent), policy='now')

    def finish(self):
        self.run.finish()


class MlflowTracker(Tracker):
    name = 'mlflow'

    def __init__(self, cfg: MlflowConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        try:
            from mlflow.entities import Metric, Param  # optional extra
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError('train.mlflow is set but mlflow is not installed: pip install -e \'.[mlflow]\'') from None
        self.metric = Metric
        uri = cfg.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or f'sqlite:///{run_dir.resolve()}/mlflow.db'
        try:
            self.client = MlflowClient(uri)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                cfg.experiment, artifact_location=(run_dir.resolve() / 'mlflow-artifacts').as_uri())
            if run_id is None:
                run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
                params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
                for start in range(0, len(params), 100):
                    self.client.log_batch(run_id, params=params[start:start + 100])
            else:
                self.client.update_run(run_id, status='RUNNING')
        except Exception as e:  # a bad URI or an unreachable server, in MLflow's or the driver's error types
            raise UserError(f'train.mlflow: MLflow did not start at {uri} ({str(e).splitlines()[0][:160]})') from None
        self.id = run_id

    def log(self, step: int, values: dict):
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.metric(key.replace('@', '_at'), float(value), now, step)
                                                for key, value in values.items()])

    def attach(self, paths: list[Path]):
        for path in paths:
            self.client.log_artifact(self.id, str(path), artifact_path='plots' if path.parent.name == 'plots' else None)

    def finish(self):
        self.client.set_terminated(self.id)


class Trackers:
    """The trackers a recipe asks for, on rank 0: one log() fans out to each, skipping what it already has."""

    def __init__(self, trackers: list[Tracker], run_dir: Path):
        self.trackers, self.state_path = trackers, Path(run_dir) / STATE_FILE
        saved = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        # per tracker: the last step it received and the keys it received at that step
        self.last = {t.name: (saved.get(t.name, {}).get('last_step', -1), set(saved.get(t.name, {}).get('keys', [])))
                     for t in trackers}
        if trackers:
            self.save_state()

    def ids(self) -> dict:
        """{tracker name: its run id}, for the checkpoint."""
        return {t.name: t.id for t in self.trackers}

    def log(self, step: int, values: dict):
        """values at step, to every tracker that has not received them yet (a resumed run replays some steps)."""
        values = {k: v for k, v in values.items() if v is not None}
        changed = False
        for tracker in self.trackers:
            last_step, keys = self.last[tracker.name]
            new = {} if step < last_step else {k: v for k, v in values.items() if step > last_step or k not in keys}
            if new:
                tracker.log(step, new)
                self.last[tracker.name] = (step, (keys if step == last_step else set()) | set(new))
                changed = True
        if changed:
            self.save_state()

    def save_state(self):
        state = {t.name: {'id': t.id, 'last_step': self.last[t.name][0], 'keys': sorted(self.last[t.name][1])}
                 for t in self.trackers}
        tmp = self.state_path.with_name(f'.{STATE_FILE}.tmp')
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_path)

    def finish(self, files: list[Path]):
        """Attach the files (report.md, the plots) and close every tracker run."""
        for tracker in self.trackers:
            tracker.attach([f for f in files if f.is_file()])
            tracker.finish()
        self.trackers = []


def open_trackers(wandb: Optional[WandbConfig], mlflow: Optional[MlflowConfig], run_dir: Path, config: dict,
                  saved_ids: dict) -> Trackers:
    """Start the recipe's trackers (continuing the runs in saved_ids, from a checkpoint, when there are some)."""
    run_dir = Path(run_dir)
    trackers = []
    if wandb is not None and wandb.project:
        trackers.append(WandbTracker(wandb, run_dir, config, saved_ids.get('wandb')))
    if mlflow is not None and mlflow.experiment:
        trackers.append(MlflowTracker(mlflow, run_dir, config, saved_ids.get('mlflow')))
    return Trackers(trackers, run_dir)
