"""Process group set-up from torchrun or SLURM variables, and the few collectives the loop needs.

The same code runs on one process (no process group at all) and on N; nothing here launches processes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from .errors import UserError, summary


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    control: object = None  # a gloo group for host-side votes, which must not wait for the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over all ranks (float64, so counts stay exact)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def first_rank_with(self, flag: bool) -> Optional[int]:
        """The lowest rank whose flag is set, or None; one small all-reduce on the host, every rank must call."""
        if not self.distributed:
            return self.rank if flag else None
        vote = torch.tensor([self.size - self.rank if flag else 0], dtype=torch.int64)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.control)
        return self.size - int(vote) if int(vote) else None

    def broadcast_from_main(self, value):
        """Rank 0's value (any picklable object) on every rank, over the host-side group; every rank must call."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def run_on_main(self, action, what: str):
        """action() on rank 0 alone, its result there (None elsewhere); every rank must call. When it raises, rank 0
        raises that error (a UserError as one line, anything else with its traceback) and every other rank stops
        with a one-line UserError saying rank 0 could not `what`, instead of waiting for rank 0 in its next
        collective until the process group's timeout."""
        result, failure = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as e:
                failure = e
        if self.distributed:
            told = self.broadcast_from_main(None if failure is None else summary(failure))
            if told is not None and not self.is_main:
                raise UserError(f'rank 0 could not {what}: {told}')
        if failure is not None:
            raise failure
        return result

    def run_on_every_rank(self, action, what: str):
        """action() on every rank, its result; every rank must call. When it raises on any rank (a node's own
        disk, say), every rank stops with the same one-line UserError naming the first such rank and its error,
        instead of the others waiting for it in their next collective. An error that is not a UserError keeps its
        traceback on its own rank."""
        result, failure = None, None
        try:
            result = action()
        except Exception as e:
            failure = e
        told = self.gather(None if failure is None else summary(failure))
        if failure is not None and (not self.distributed or not isinstance(failure, UserError)):
            raise failure
        first = next((rank for rank, said in enumerate(told) if said is not None), None)
        if first is not None:
            raise UserError(f'rank {first} could not {what}: {told[first]}')
        return result

    def gather(self, value) -> list:
        """Every rank's value (any picklable object), in rank order, over the host-side group."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def average_batchnorm(self, model: torch.nn.Module):
        """Every rank's BatchNorm running statistics replaced by their mean over ranks (one flat all-reduce)."""
        if not self.distributed:
            return
        buffers = [b for layer in model.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
                   and layer.track_running_stats for b in (layer.running_mean, layer.running_var)]
        if not buffers:
            return
        flat = torch.cat([b.flatten() for b in buffers])
        dist.all_reduce(flat)
        flat /= self.size
        for b, values in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(values.view_as(b))


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']."""
    hosts = []
    for prefix, ranges, plain in re.findall(r'([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)', nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(','):
            low, _, high = part.partition('-')
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f'{prefix}{n:0{len(low)}d}')
    return hosts


def _env_from_slurm(env: dict) -> dict:
    """torchrun-style variables from SLURM's, for `srun python train.py` without torchrun."""
    if 'RANK' in env or 'SLURM_PROCID' not in env or int(env.get('SLURM_NTASKS', '1')) <= 1:
        return {}
    out = {'RANK': env['SLURM_PROCID'], 'WORLD_SIZE': env['SLURM_NTASKS'],
           'LOCAL_RANK': env.get('SLURM_LOCALID', '0')}
    if 'MASTER_ADDR' not in env:
        hosts = expand_slurm_nodelist(env.get('SLURM_JOB_NODELIST', env.get('SLURM_NODELIST', 'localhost')))
        out['MASTER_ADDR'] = hosts[0] if hosts else 'localhost'
    if 'MASTER_PORT' not in env:
        out['MASTER_PORT'] = str(20000 + int(env.get('SLURM_JOB_ID', '9000')) % 20000)
    return out


def init(device: str = 'auto') -> World:
    """Join the process group described by the environment, or run alone if there is none."""
    os.environ.update(_env_from_slurm(dict(os.environ)))
    size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', device):
        raise UserError(f'--device {device!r}: expected auto, cpu, cuda or cuda:N')
    use_cuda = torch.cuda.is_available() if device == 'auto' else device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f'--device {device}: no CUDA device is available here')
    dev = torch.device('cuda', cuda_index(device, local_rank)) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(dev)
    if 'TORCHELASTIC_RUN_ID' in os.environ:
        stop_with_parent()
    control = None
    if size > 1:
        if not dist.is_initialized():
            backend = 'nccl' if use_cuda else 'gloo'
            timeout = timedelta(minutes=30)
            dist.init_process_group(backend, store=attempt_store(rank, size, timeout), rank=rank, world_size=size,
                                    timeout=timeout, **({'device_id': dev} if use_cuda else {}))
        control = dist.new_group(backend='gloo') if use_cuda else dist.group.WORLD
    return World(rank=rank, size=size, local_rank=local_rank, device=dev, control=control)


def attempt_store(rank: int, size: int, timeout: timedelta) -> dist.Store:
    """torch's env:// store, with keys private to this torchrun attempt when the store outlives attempts.

    By default torchrun keeps one agent store across restarts; without the prefix a restarted rank can read the
    previous attempt's gloo address of its peer and fail with "Connection refused" (about one restart in two on
    this machine). The prefix counts this agent's restarts, which agents on other nodes do not share (see
    restarts_share_a_store). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each attempt's rank 0 hosts a new store:
    no prefix is needed, and none is used, since ranks whose agents counted differently would never meet."""
    store, _, _ = next(dist.rendezvous('env://', rank=rank, world_size=size, timeout=timeout))
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return store
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def restarts_share_a_store(env: dict) -> bool:
    """Whether torchrun may restart workers on several nodes while its agents keep one store. An agent restarts
    healthy workers when a peer node rejoins without counting a restart, so the attempt prefixes of the nodes
    part: the first restarted attempt reads its peers' addresses from an older one (seen: "Connection refused"
    until the restarts ran out)."""
    return (env.get('TORCHELASTIC_USE_AGENT_STORE') == 'True' and int(env.get('GROUP_WORLD_SIZE', '1')) > 1
            and int(env.get('TORCHELASTIC_MAX_RESTARTS', '0')) > 0)


def stop_with_parent():
    """Ask Linux for a SIGTERM when the torchrun agent that started this process dies (PR_SET_PDEATHSIG), so that
    orphaned ranks checkpoint and stop instead of training on beside a restarted job. The loop also compares
    the parent pid at every step, for where this is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cuda_index(device: str, local_rank: int) -> int:
    """This process's GPU: N for --device cuda:N (one process per node), else the local rank's own GPU.

    Two processes on one GPU would make NCCL fail later with "Duplicate GPU detected"; say so now, with counts.
    """
    count = torch.cuda.device_count()
    per_node = int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))
    if ':' in device:
        index = int(device.split(':')[1])
        if per_node > 1:
            raise UserError(f'--device {device} names one GPU, but this node runs {per_node} processes: pass '
                            f'--device cuda and each takes the GPU of its local rank')
        if index >= count:
            raise UserError(f'--device {device}: this node has {count} visible GPU(s) (cuda:0 to cuda:{count - 1})')
        return index
    if local_rank >= count or per_node > count:
        raise UserError(f'{per_node} processes on this node but {count} visible GPU(s): start at most {count} '
                        f'(torchrun --nproc_per_node={count}), or check CUDA_VISIBLE_DEVICES')
    return local_rank


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
