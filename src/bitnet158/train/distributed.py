"""Data-parallel training under ``torchrun``: DDP, or FSDP2 (``fully_shard`` per block, then the root).

    torchrun --nproc_per_node=8 -m bitnet158.cli pretrain RECIPE --parallel fsdp
    python -m torch.distributed.run --nproc_per_node=2 -m bitnet158.cli pretrain RECIPE --device cpu
    torchrun --nproc_per_node=8 -m bitnet158.cli sft RECIPE --parallel fsdp        # also: dpo

``DistContext`` is what the training loop talks to (the same interface as
``loop.LocalContext``): it initializes the process group (NCCL on GPUs, gloo on the CPU), wraps the
model, turns gradient sync off for all but the last micro-batch, reduces metrics, and gathers /
scatters *full* state dicts for checkpoints — so a checkpoint written by 8 FSDP ranks loads in one
process and the other way round.

FSDP2 and absmean: ``fully_shard`` keeps each parameter as a DTensor shard, but all-gathers the
unsharded weight before a module's forward and registers it as the module's parameter for the
duration, so ``BitLinear.forward`` sees the full ``[out, in]`` weight and its absmean scale is the
mean over the whole tensor, exactly as on one process (tested: same losses as one process).
The model never imports this module.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .loop import LocalContext


# set once this process has closed its process group (DistContext.close)
_closed = False


def exit_if_closed(code: int) -> None:
    """End a torchrun rank that closed its process group with ``os._exit(code)``, after flushing
    logging and the standard streams, instead of running interpreter finalization.

    Why: ``destroy_process_group`` drops the group, but FSDP's device mesh may still hold it, so
    gloo's worker threads live on; one may still be releasing a finished collective (a barrier
    and the all-gather it waited for) whose tensors hold Python references. If that happens while
    the interpreter finalizes, acquiring the GIL ends the thread and the C++ runtime aborts the
    process ("terminate called without an active exception", exit code -6): seen on 2-core CPUs
    under load in about one 2-rank run in ten, after every output file had been written. Every
    file this package writes is closed before the command returns, so nothing is lost."""
    if not _closed:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class DistContext(LocalContext):
    """One rank of a ``torchrun`` job. ``mode`` is "ddp" or "fsdp"."""

    def __init__(self, mode: str, device: str = "auto"):
        if mode not in ("ddp", "fsdp"):
            raise ConfigError(f"--parallel {mode!r} is not 'ddp' or 'fsdp'")
        self.mode = mode
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is available")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module, mixed_precision: bool = True, blocks=None,
             methods: tuple[str, ...] = ("hidden", "logits")) -> torch.nn.Module:
        """DDP, or FSDP2: ``fully_shard`` each of ``blocks`` (default ``model.model.layers``), then the root.

        ``methods``: methods of the root besides ``forward`` that run the model under FSDP (they get
        its all-gather / reshard hooks). Under DDP only ``forward`` syncs gradients: a loss that
        needs the head lives in the wrapped module's ``forward`` (``head_loss.HeadLoss``: what pretraining,
        SFT and DPO wrap).
        """
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        return self._shard(model, mixed_precision, blocks, methods)

    def wrap_frozen(self, model: torch.nn.Module, mixed_precision: bool = True, blocks=None) -> torch.nn.Module:
        """A model that is only run (no gradients: the DPO reference): as is under DDP, sharded like the
        trained model under FSDP2 (same bf16 parameter cast, so the same forward; 1/world of the memory)."""
        if self.mode == "ddp":
            return model
        return self._shard(model, mixed_precision, blocks, ())

    def _shard(self, model, mixed_precision: bool, blocks, methods) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        mesh = init_device_mesh(self.device.type, (self.world,))
        # bf16 params in forward/backward, fp32 gradient reduction (the master weights stay fp32)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision and self.device.type == "cuda" else MixedPrecisionPolicy())
        for layer in (blocks if blocks is not None else model.model.layers):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        for method in methods:   # loss functions may call these instead of forward
            register_fsdp_forward_method(model, method)
        return model

    def sync_grads(self, model, sync: bool):
        if self.mode == "ddp":
            return contextlib.nullcontext() if sync else model.no_sync()
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then destroy the process group (see ``exit_if_closed``)."""
        global _closed
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            _closed = True

    # ------------------------------------------------------------------ full state dicts
    def full_model_state(self, model) -> dict:
        """The full (unsharded) model state dict on CPU on rank 0 ({} elsewhere under FSDP). Collective."""
        if self.mode == "ddp":
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_state(self, model, optimizer) -> tuple[dict, dict]:
        if self.mode == "ddp":
            return super().full_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        return msd, osd

    def load_full_state(self, model, optimizer, msd: dict, osd: dict | None) -> None:
        if self.mode == "ddp":
            return super().load_full_state(model, optimizer, msd, osd)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, msd, options=opts)
        if osd is not None:
            set_optimizer_state_dict(model, optimizer, osd, options=opts)
