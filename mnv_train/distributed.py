"""Process group set-up from torchrun or SLURM variables, and the few collectives the loop needs.

The same code runs on one process (no process group at all) and on N; nothing here launches processes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

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

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self):
        if self.distributed:
            dist.barrier()


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
    use_cuda = torch.cuda.is_available() if device == 'auto' else device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f'--device {device}: no CUDA device is available here')
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device('cuda', torch.cuda.current_device())
    else:
        dev = torch.device('cpu')
    if size > 1 and not dist.is_initialized():
        backend = 'nccl' if use_cuda else 'gloo'
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                **({'device_id': dev} if use_cuda else {}))
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
