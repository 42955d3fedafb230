"""Random segmented ternary weights for the W2A8 kernel tests (imported by the test modules here;
pytest puts this folder on ``sys.path``, as it has no ``__init__.py``). No Triton import: the test
modules set ``TRITON_INTERPRET`` before they import the kernels.
"""

import torch

from bitnet158 import quant


def segmented(segs, K, gen):
    """Random ternary weights of several segments -> (packed [R, K], gammas, reference int8 [N, K] list)."""
    parts, gam, w_ts = [], [], []
    for r in segs:
        w_t = torch.randint(-1, 2, (4 * r, K), generator=gen, dtype=torch.int8)
        w_ts.append(w_t)
        parts.append(quant.pack_hf(w_t))
        gam.append(float(torch.rand((), generator=gen)) + 0.05)
    return torch.cat(parts), torch.tensor(gam, dtype=torch.float32), w_ts


def check_linear(linear, M, segs, K, dev, cfg=None, seed=0):
    """Run ``linear`` (``w2a8.w2a8_linear``) at block shapes ``cfg`` (None: its own choice) on random
    segmented weights: int32 sums exact (unit scales, fp32 out), then bf16 outputs equal to the
    reference epilogue. Returns the bf16 output (on ``dev``)."""
    gen = torch.Generator().manual_seed(seed + M * 131 + K)
    w, g, w_ts = segmented(segs, K, gen)
    x_q = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    s = torch.rand(M, generator=gen) * 50 + 1
    accs = [quant.int_matmul(x_q, w_t) for w_t in w_ts]
    ref = torch.cat([(a.float() * (gi / s[:, None])).to(torch.bfloat16) for a, gi in zip(accs, g)], 1)
    kw = dict(config=cfg) if cfg is not None else {}
    y_int = linear(x_q.to(dev), torch.ones(M, device=dev), w.to(dev), torch.ones_like(g).to(dev), segs,
                   out_dtype=torch.float32, **kw)
    assert torch.equal(y_int.cpu().to(torch.int32), torch.cat(accs, 1))
    out = torch.full((M, 4 * sum(segs)), float("nan"), dtype=torch.bfloat16, device=dev)
    y = linear(x_q.to(dev), s.to(dev), w.to(dev), g.to(dev), segs, out=out, **kw)
    assert torch.equal(y.cpu(), ref)
    return y
