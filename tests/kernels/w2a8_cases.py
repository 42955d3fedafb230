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
