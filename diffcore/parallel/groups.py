"""The process groups one pipeline owns, their layout check, and the contextvar that carries them.

Rank layout (world = sp_degree x (2 if cfg_parallel else 1)): rank ``r`` computes the guidance branches
``r // sp_degree``, ``r // sp_degree + 2``, ... of a step (0 = conditional, 1 = unconditional, then a config's
extra branches, e.g. LTX-2's perturbed and modality-isolated calls) and sequence shard ``r % sp_degree``. The
sequence-parallel group of a rank is the ``sp_degree`` ranks of its branch; its CFG group is the
two ranks holding the same shard of the two branches.

torch.distributed's default group is process-wide by torch's design; diffcore initialises it only
when nothing did before (gloo on CPU, NCCL on CUDA) and keeps every group it uses on the pipeline's
``ParallelGroups``. During ``pipeline.forward`` the pipeline's EngineContext sets them as ``CURRENT``,
which is how the attention dispatch and the denoising loop see them: a contextvar, so concurrent
requests in other threads (or other pipelines in this process) are unaffected.
"""
from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Optional

import torch

from ..errors import ParallelConfigError

# Set by the pipeline's EngineContext around each forward (diffcore.engine.context).
CURRENT: ContextVar[Optional["ParallelGroups"]] = ContextVar("diffcore_parallel", default=None)


def current() -> Optional["ParallelGroups"]:
    """The parallel groups of the pipeline whose forward is running in this context, or None."""
    return CURRENT.get()


def launched_world_size() -> Optional[int]:
    """Processes in this job: the initialised default group's size, else torchrun's ``WORLD_SIZE``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def _denoiser_heads(folder: Path, names) -> dict[str, int]:
    heads = {}
    for name in names:
        path = Path(folder) / name / "config.json"
        if path.is_file():
            n = json.loads(path.read_text()).get("num_attention_heads")
            if isinstance(n, int):
                heads[name] = n
    return heads


def check_parallel(sp_degree: int, cfg_parallel: bool, config, folder: Path, pipeline_name: str) -> None:
    """Refuse a parallel layout that cannot run, before any weights are loaded."""
    world = sp_degree * (2 if cfg_parallel else 1)
    if world == 1:
        launched = launched_world_size()
        if launched is not None and launched > 1:  # N independent copies that would each write the output
            raise ParallelConfigError(
                f"this process is one of {launched} launched together (torchrun WORLD_SIZE={launched}), but "
                "sp_degree=1 without cfg_parallel runs a generation in one process, so every rank would compute and "
                f"write the same result; pass --sp-degree / --cfg-parallel so that sp_degree x (2 with cfg_parallel) "
                f"= {launched}, or start one process (for more requests per second: serve --replicas)")
        return
    layout = f"sp_degree={sp_degree}" + (" with cfg_parallel" if cfg_parallel else "")
    if sp_degree > 1 and not config.sequence_parallel:
        raise ParallelConfigError(
            f"{pipeline_name} ({type(config).__name__}) does not support sequence parallelism; "
            "use sp_degree=1 (cfg_parallel may still apply)")
    if cfg_parallel and config.cfg == "none":
        raise ParallelConfigError(
            f"{pipeline_name} ({type(config).__name__}) runs without classifier-free guidance, so cfg_parallel "
            "would leave half the ranks idle; drop cfg_parallel")
    if sp_degree > 1:
        for name, heads in _denoiser_heads(folder, config.denoiser_components).items():
            if heads % sp_degree:
                divisors = [d for d in range(1, heads + 1) if heads % d == 0]
                raise ParallelConfigError(
                    f"{name} has {heads} attention heads, which do not divide by sp_degree={sp_degree} (Ulysses "
                    f"gives each rank heads/sp_degree heads); use sp_degree in {divisors}")
    launched = launched_world_size()
    if launched is None:
        raise ParallelConfigError(
            f"{layout} needs {world} processes, but this process was not started by a distributed launcher; "
            f"run e.g. `torchrun --nproc-per-node {world} -m diffcore generate ...`")
    if launched != world:
        raise ParallelConfigError(
            f"{layout} needs world size sp_degree x {2 if cfg_parallel else 1} = {world}, but {launched} processes "
            f"were launched; start {world} (torchrun --nproc-per-node {world}) or change the options")


def rank_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun lays them out); others unchanged."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


class ParallelGroups:
    """This rank's place in the (CFG branch, sequence shard) grid and the groups it talks over."""

    def __init__(self, sp_degree: int, cfg_parallel: bool, device: str = "cpu"):
        import torch.distributed as dist

        self.owns_default_group = False
        if not dist.is_initialized():
            cuda = torch.device(device).type == "cuda"
            if cuda:
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if cuda else "gloo")
            self.owns_default_group = True
        self.sp_degree, self.cfg_parallel = int(sp_degree), bool(cfg_parallel)
        branches = 2 if cfg_parallel else 1
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != self.sp_degree * branches:
            raise ParallelConfigError(f"world size {self.world_size} != sp_degree {sp_degree} x {branches}")
        self.sp_rank, self.cfg_rank = self.rank % self.sp_degree, self.rank // self.sp_degree
        self.sp_group = self.cfg_group = None
        self._groups = []
        # collective calls made for generations (observability; the equality tests check they happen)
        self.stats = {"all_to_all": 0, "branch_gathers": 0}
        # every rank creates every group, in the same order (torch.distributed requires it)
        if self.sp_degree > 1:
            for b in range(branches):
                ranks = list(range(b * self.sp_degree, (b + 1) * self.sp_degree))
                group = dist.new_group(ranks)
                self._groups.append(group)
                if self.rank in ranks:
                    self.sp_group = group
        if cfg_parallel:
            for s in range(self.sp_degree):
                ranks = [s, s + self.sp_degree]
                group = dist.new_group(ranks)
                self._groups.append(group)
                if self.rank in ranks:
                    self.cfg_group = group

    def gather_branches(self, mine: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        """All ``count`` predictions of a step, in branch order, from this rank's share (branches
        ``cfg_rank``, ``cfg_rank + 2``, ...) and its CFG partner's. Every prediction has the same shape; the
        shorter share is padded with zeros so one all-gather serves any number of branches."""
        import torch.distributed as dist

        self.stats["branch_gathers"] += 1
        per_rank = (count + 1) // 2
        stacked = torch.stack(mine + [torch.zeros_like(mine[0])] * (per_rank - len(mine))).contiguous()
        out = [torch.empty_like(stacked) for _ in range(2)]
        dist.all_gather(out, stacked, group=self.cfg_group)
        return [out[i % 2][i // 2] for i in range(count)]

    def close(self) -> None:
        """Destroy the groups (and the default group if diffcore created it)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        for group in self._groups:
            dist.destroy_process_group(group)
        self._groups, self.sp_group, self.cfg_group = [], None, None
        if self.owns_default_group:
            dist.destroy_process_group()
            self.owns_default_group = False

    def __repr__(self) -> str:
        return (f"ParallelGroups(rank={self.rank}/{self.world_size}, sp_degree={self.sp_degree} "
                f"(shard {self.sp_rank}), cfg_parallel={self.cfg_parallel} (branch {self.cfg_rank}))")
