"""The checkpoint file format: atomic writes, a checksum manifest, safe loading, pruning, periodic saves.

Each checkpoint is `step-NNNNNNNN.pt` plus a JSON manifest (sha256, size, step, epoch, metrics) beside it.
`last.pt` and `best.pt` are hard links to step files. A file that fails its checksum, or that holds
Python objects besides tensors and plain data, is refused.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from . import logs
from .errors import UserError

FORMAT = 'mnv-train/1'
RUN_PARTS = ('model', 'optimizer', 'scaler', 'state', 'rng', 'recipe', 'plan')  # what a run resumes from


def _fsync_dir(directory: Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes):
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never half.
    A write that fails (a full disk) leaves neither a temp file nor a change."""
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _link(source: Path, target: Path):
    tmp = target.with_name(f'.{target.name}.tmp-{os.getpid()}')
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, target)


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + '.json')


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise UserError(f'checkpoint {path}: its manifest {manifest_path(path).name} is missing or broken ({e})') \
            from None
    if not isinstance(manifest, dict):
        raise UserError(f'checkpoint {path}: its manifest {manifest_path(path).name} is not a JSON object')
    return manifest


def _torch_load(data: bytes, path: Path) -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else 'unpickling failed'
        raise UserError(f'checkpoint {path} refused: it holds Python objects, not only tensors ({first})') from None
    except Exception as e:  # a damaged file can make the unpickler raise almost anything
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f'checkpoint {path} is truncated or corrupt ({first[:160]})') from None


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a block at a time: what names a weight file's contents."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write(path: Path, payload: dict, meta: dict):
    """A checkpoint and its manifest (sha256, size, meta), each written atomically; the manifest goes last,
    so a crash in between leaves a file that fails its check rather than one that passes wrongly."""
    buffer = io.BytesIO()
    torch.save({**payload, 'format': FORMAT}, buffer)
    data = buffer.getvalue()
    manifest = {**meta, 'format': FORMAT, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
    written = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        written = True
        atomic_write(manifest_path(path), json.dumps(manifest, indent=1).encode())
    except OSError as e:
        if written:  # without its manifest it would only be skipped with a warning
            path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f'the disk is full: saving {path} failed, the earlier checkpoints beside it are intact; '
                            f'free some space, then continue with --resume auto') from None
        raise UserError(f'cannot save checkpoint {path}: {e.strerror or e}') from None


def load(path: Path, needs: tuple = ()) -> dict:
    """A checkpoint written by `write`, after checking its size and sha256 against the manifest, holding at least
    the parts in `needs`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint {path} not found')
    manifest = read_manifest(path)
    data = path.read_bytes()
    if len(data) != manifest.get('bytes') or hashlib.sha256(data).hexdigest() != manifest.get('sha256'):
        raise UserError(f'checkpoint {path} is truncated or corrupt (checksum does not match its manifest)')
    payload = _torch_load(data, path)
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise UserError(f'checkpoint {path} is not an mnv-train checkpoint')
    missing = [part for part in needs if payload.get(part) is None]
    if missing:
        raise UserError(f'checkpoint {path} holds no {", ".join(missing)}: it was not written by a training run')
    return payload


@dataclass
class StoredWeights:
    """The weights a file holds, whatever wrote it."""
    raw: Optional[dict]  # None in an average of EMA weights
    ema: Optional[dict]
    recipe: Optional[dict]  # the training recipe, which only mnv-train checkpoints carry
    manifest: Optional[dict]  # None when nothing checked the file (plain weight files)

    @property
    def preferred(self) -> dict:
        """The EMA weights when the file holds some, else the raw ones: what a teacher or a fine-tuning starts from."""
        return self.raw if self.ema is None else self.ema


RAW_KEYS, EMA_KEYS = ('model', 'state_dict'), ('ema', 'state_dict_ema', 'model_ema')  # ours, then timm's


def read_weights(path: Path, needs: tuple = ('model',)) -> StoredWeights:
    """The weights of an mnv-train checkpoint (checked against its manifest, holding the parts in `needs`), of a
    timm/torch .pth file (weights only) or a .safetensors file; an mnv-train checkpoint copied without its manifest
    is read as a plain file, with a warning that nothing checked it."""
    path = Path(path)
    if path.is_dir():  # '.' has no name to put a manifest's beside
        raise UserError(f'{path} is a folder: give a checkpoint file in it (e.g. checkpoints/last.pt)')
    if manifest_path(path).is_file():
        payload, manifest = load(path, needs), read_manifest(path)
        if (manifest.get('averaged') or {}).get('weights') == 'ema':  # mnv_train.average keeps them as its model
            return StoredWeights(None, payload['model'], payload.get('recipe'), manifest)
        return StoredWeights(payload['model'], payload.get('ema'), payload.get('recipe'), manifest)
    if not path.is_file():
        raise UserError(f'checkpoint {path} not found')
    if path.suffix == '.safetensors':
        try:
            return StoredWeights(load_file(str(path)), None, None, None)
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f'{path}: not a readable safetensors file ({e})') from None
    payload = _torch_load(path.read_bytes(), path)
    if not isinstance(payload, dict):
        raise UserError(f'{path}: no model weights found in it')
    ours = payload.get('format') == FORMAT
    if ours:
        logs.warn(f'{path} has no manifest {manifest_path(path).name} beside it: read without checking its checksum')
    raw, ema = (next((payload[key] for key in keys if isinstance(payload.get(key), dict)), None)
                for keys in (RAW_KEYS, EMA_KEYS))
    if raw is None and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raw = payload  # a bare state dict
    if raw is None:
        raise UserError(f'{path}: no model weights found in it')
    recipe = payload.get('recipe') if ours else None
    return StoredWeights(raw, ema, recipe if isinstance(recipe, dict) else None, None)


class Checkpointer:
    """Writes step checkpoints (rank 0 only), keeps the newest `keep`, the `keep_best` best-evaluated ones
    (for checkpoint averaging), and last and best; and says when a periodic checkpoint is due."""

    def __init__(self, directory: Path, keep: int, is_writer: bool, keep_best: int = 0, every_steps: int = 0,
                 every_minutes: float = 0.0):
        self.directory, self.keep, self.is_writer, self.keep_best = Path(directory), keep, is_writer, keep_best
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last_save = time.monotonic()

    def due_by_steps(self, step: int) -> bool:
        """train.checkpoint_every_steps: the same answer on every rank."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def due_by_clock(self) -> bool:
        """train.checkpoint_every_minutes, by this process's clock; ranks must agree on rank 0's answer."""
        return bool(self.every_minutes) and time.monotonic() - self.last_save >= 60 * self.every_minutes

    def step_files(self) -> list[Path]:
        return sorted(self.directory.glob('step-*.pt'), reverse=True)

    def ranked(self, key: str) -> list[tuple[float, Path]]:
        """(metric, step file) by `key` ('top1', 'ema_top1'), best first, for files evaluated at their own step
        (a mid-epoch save carries the previous epoch's metrics, which are not its own)."""
        scored = []
        for path in self.step_files():
            try:
                manifest = read_manifest(path)
            except UserError:
                continue
            metrics = manifest.get('metrics') or {}
            if metrics.get('step') == manifest.get('step') and key in metrics:
                scored.append((metrics[key], path))
        return sorted(scored, key=lambda item: item[0], reverse=True)

    def save(self, payload: dict, meta: dict, is_best: bool) -> Optional[Path]:
        self.last_save = time.monotonic()
        if not self.is_writer:
            return None
        path = self.directory / f'step-{meta["step"]:08d}.pt'
        write(path, payload, meta)
        for name in ('last.pt',) + (('best.pt',) if is_best else ()):
            _link(path, self.directory / name)
            _link(manifest_path(path), manifest_path(self.directory / name))
        best = ({kept for key in ('top1', 'ema_top1') for _, kept in self.ranked(key)[:self.keep_best]}
                if self.keep_best else set())
        for old in self.step_files()[self.keep:]:
            if old not in best:
                old.unlink(missing_ok=True)
                manifest_path(old).unlink(missing_ok=True)
        return path

    def latest_valid(self) -> Optional[tuple[Path, dict]]:
        """The newest checkpoint a run can resume from; broken ones are skipped with a warning."""
        for path in self.step_files():
            try:
                return path, load(path, needs=RUN_PARTS)
            except UserError as e:
                logs.warn(f'{e}; falling back to an older checkpoint')
        return None
