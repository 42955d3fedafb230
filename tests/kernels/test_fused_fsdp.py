"""The fused training path under FSDP2: 2 CPU processes (gloo), torch backend.

``use_fused_bitlinear`` is applied before ``fully_shard`` (per block, then the root). Each rank
runs the fused blocks and the fused head loss (``model.hidden`` registered as an FSDP forward
method) on half of a batch; the gathered gradients must equal those of one process running the same
fused model on the whole batch (1e-5 relative): absmean sees the full, all-gathered weight.

    python3 -m pytest -q tests/kernels/test_fused_fsdp.py
"""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from bitnet158.config import ModelConfig
from bitnet158.kernels.bitlinear_train import use_fused_bitlinear
from bitnet158.model import Transformer, init_weights
from bitnet158.train.losses import fused_linear_cross_entropy


def _model():
    torch.manual_seed(0)
    m = init_weights(Transformer(ModelConfig.from_name("tiny", dtype="float32")))
    use_fused_bitlinear(m, backend="torch")
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (4, 17), generator=g)


def _loss(model, rows):
    h = model.hidden(rows[:, :-1])
    return fused_linear_cross_entropy(h.flatten(0, 1), model.head_weight, rows[:, 1:].reshape(-1))


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "hidden")
        rows = _batch()[rank * 2:(rank + 1) * 2]
        loss = _loss(model, rows)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            from safetensors.torch import save_file
            save_file({n: g.contiguous() for n, g in grads.items()}, out)
    finally:
        dist.destroy_process_group()
    # A spawned worker sometimes aborts in torch's C++ teardown at interpreter exit, after its work
    # is done and saved ("terminate called without an active exception", ~1 run in 15 here): leave
    # without running the static destructors. Errors above still propagate to mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "rank0.safetensors"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    from safetensors.torch import load_file
    got = {"grads": load_file(str(out))}
    model = _model()
    _loss(model, _batch()).backward()
    for n, p in model.named_parameters():
        g = got["grads"][n]
        assert float((g - p.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()), n
