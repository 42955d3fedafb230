"""Logit parity with transformers' BitNetForCausalLM, the independent reference (SPEC §3 recipe).

Random tiny configs (GQA ratios 1/2/4, odd vocabularies, one untied head), each projection kind
with its own weight std so that a wrong scale convention shows. For each of the three layouts the
same folder is loaded by transformers and by ``bitnet158.checkpoint.load`` and the logits compared:
fp32 max abs diff <= 1e-4; bf16 within two bf16 ulps of the logit scale. Negative controls
(scale divided instead of multiplied; rows packed interleaved instead of in blocks) must miss by a
wide margin. Greedy continuations, cached decoding and our ``save`` are checked against it too.

transformers decorates its BitNet kernels with ``torch.compile``; compiling on a CPU takes minutes,
so these tests run them eagerly (same math), on one thread. Needs the ``test`` extra (transformers, accelerate).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch

from bitnet158 import checkpoint, quant
from bitnet158.random_model import random_config, random_model, write_random_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it

CONFIGS = ["parity-mha", "parity-gqa2", "parity-gqa4"]  # GQA 1, 2, 4; vocab 301, 300, 257
LAYOUTS = ["packed", "master", "bitlinear"]
FP32_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _eager_transformers():
    import torch._dynamo

    old, threads = torch._dynamo.config.disable, torch.get_num_threads()
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)  # tiny models: more threads only spin when the machine is busy
    transformers.logging.set_verbosity_error()
    yield
    torch._dynamo.config.disable = old
    torch.set_num_threads(threads)


def hf_load(folder, dtype=torch.float32, direct=False):
    """transformers' model, loaded in fp32 then cast (5.x: embeddings stay bf16 unless cast).
    ``direct`` loads in ``dtype`` instead: its packed ``BitLinear`` (linear_class "bitlinear")
    fixes its compute dtype at construction, so ``.to()`` does not change it."""
    from transformers import BitNetForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = BitNetForCausalLM.from_pretrained(folder, dtype=dtype if direct else torch.float32,
                                              attn_implementation="eager")
    return m.to(dtype).eval()


_FOLDERS: dict = {}
_HF: dict = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    def get(cfg_name: str, layout: str):
        key = (cfg_name, layout)
        if key not in _FOLDERS:
            path = tmp_path_factory.mktemp(f"{cfg_name}-{layout}")
            spelling = "v5" if cfg_name == "parity-gqa4" else "v4"  # transformers reads both
            _FOLDERS[key] = write_random_folder(path / "m", cfg_name, layout=layout, seed=1,
                                                spelling=spelling)
        return _FOLDERS[key]

    yield get
    _FOLDERS.clear()
    _HF.clear()


def hf_fp32(folders, cfg_name, layout):
    key = (cfg_name, layout)
    if key not in _HF:
        _HF[key] = hf_load(folders(cfg_name, layout))
    return _HF[key]


def tokens(cfg_name, batch=2, length=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, random_config(cfg_name).vocab_size, (batch, length), generator=g)


def bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(x)) - 7)


_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def _recording(model):
    """Yields a list that collects (name, input) of every projection call, in execution order."""
    calls, hooks = [], []
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in _PROJ:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: calls.append((name, args[0].detach().float()))))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def assert_fp32_parity(ours, hf, t: torch.Tensor, tol: float = FP32_TOL, min_fraction: float = 0.5):
    """Logits of ``ours`` and ``hf`` on t [B, T] agree within ``tol`` wherever they must.

    The two compute the same products in a different float order (ours: exact integer product,
    then one scale; transformers: dequantized operands), so inputs to the activation quantizer
    differ in the last bit. When such an input sits on a rounding tie (x * s_x = n + 0.5 within
    1e-3) the int8 codes differ by one and every later position of that row diverges legitimately.
    This finds each row's first such flip, checks it is a tie, and compares all positions before
    it exactly (at least ``min_fraction`` of all positions must be compared; usually all are).
    """
    with _recording(ours) as a, _recording(hf) as b:
        out, ref = ours(t), hf(t).logits
    B, T = t.shape
    first = _first_flips(a, b, B, T)
    assert sum(first) >= min_fraction * B * T, f"activation flips too early to compare: {first}"
    for r in range(B):
        if first[r]:
            diff = (out[r, :first[r]] - ref[r, :first[r]]).abs().max().item()
            assert diff <= tol, f"row {r}: max abs diff {diff} > {tol} (compared {first[r]}/{T})"
    assert ref.abs().max() > 5  # a meaningful logit scale
    return first


def _first_flips(a: list, b: list, B: int, T: int) -> list[int]:
    """Per row, the first position where the int8 codes of two runs' projection inputs (a, b:
    (name, [B, T, K]) in call order) differ anywhere; each such first flip must sit on a rounding
    tie of b's codes (a last-bit difference in float order), else the runs really differ."""
    assert [n for n, _ in a] == [n for n, _ in b]
    first = [T] * B
    for (name, x), (_, y) in zip(a, b):
        qx, qy = quant.act_quant(x)[0], quant.act_quant(y)[0]
        bad = (qx != qy).any(-1)  # [B, T]
        for r in range(B):
            pos = bad[r].nonzero()
            if len(pos) and int(pos[0]) < first[r]:
                p = int(pos[0])
                first[r] = p
                v = y[r, p].float() * quant.act_scale(y[r, p])  # reference's pre-rounding codes
                cols = (qx[r, p] != qy[r, p]).nonzero()[:, 0]
                tie = ((v[cols] - v[cols].floor()) - 0.5).abs().max().item()
                assert tie < 1e-3, f"{name} row {r} pos {p}: int8 codes differ away from a tie ({tie})"
    return first


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_fp32_logits_match(folders, cfg_name, layout):
    t = tokens(cfg_name)
    hf = hf_fp32(folders, cfg_name, layout)
    assert_fp32_parity(checkpoint.load(folders(cfg_name, layout), dtype=torch.float32,
                                       attn_impl="eager"), hf, t)
    # the default (sdpa) attention too
    assert_fp32_parity(checkpoint.load(folders(cfg_name, layout), dtype=torch.float32), hf, t)
    if layout == "master":  # trainable latents: the fake-quantized forward equals the online model
        train = checkpoint.load(folders(cfg_name, layout), dtype=torch.float32, packed=False)
        assert_fp32_parity(train, hf, t)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_bf16_logits_within_bf16_rounding(folders, cfg_name, layout):
    """bf16 models differ from the fp32 model by bf16 rounding (and the int8 flips it causes:
    thousands here, in transformers as in ours); ours must be as close to the fp32 reference as
    transformers' own bf16 run is: max error <= 1.5x theirs + 1 ulp, mean <= 1.2x theirs."""
    t = tokens(cfg_name)
    exact = hf_fp32(folders, cfg_name, layout)(t).logits
    theirs = hf_load(folders(cfg_name, layout), torch.bfloat16, direct=layout == "bitlinear")
    theirs = theirs(t).logits.float()
    ours = checkpoint.load(folders(cfg_name, layout), dtype=torch.bfloat16, attn_impl="eager")(t)
    assert ours.dtype == torch.bfloat16
    ulp = bf16_ulp(exact.abs().max().item())
    e_ours, e_theirs = (ours.float() - exact).abs(), (theirs - exact).abs()
    assert e_ours.max() <= 1.5 * e_theirs.max() + ulp, (e_ours.max() / ulp, e_theirs.max() / ulp)
    assert e_ours.mean() <= 1.2 * e_theirs.mean(), (e_ours.mean() / ulp, e_theirs.mean() / ulp)
    assert e_theirs.max() < 16 * ulp  # both are bf16-rounding close, not broken


@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_negative_controls_fail_widely(folders, cfg_name):
    t = tokens(cfg_name)
    ref = hf_fp32(folders, cfg_name, "packed")(t).logits
    ours = checkpoint.load(folders(cfg_name, "packed"), dtype=torch.float32, attn_impl="eager")
    divided = copy.deepcopy(ours)  # llama.cpp-converter bug: divide by weight_scale
    for _, mod in divided.projections():
        mod.weight_scale.copy_(1.0 / mod.weight_scale)
        mod.invalidate()
    assert (divided(t) - ref).abs().max().item() > 1000 * FP32_TOL
    interleaved = copy.deepcopy(ours)  # unpacking rows 4r+k instead of k*R+r
    for _, mod in interleaved.projections():
        w = quant.unpack_hf(mod.weight)                            # [out, in] in block order
        out = w.shape[0]
        perm = torch.arange(out).view(4, out // 4).t().reshape(-1)  # interleaved row order
        mod.weight.copy_(quant.pack_hf(w[perm]))
        mod.invalidate()
    assert (interleaved(t) - ref).abs().max().item() > 1000 * FP32_TOL


def greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation with the model's static KV cache (prompt [1, T])."""
    T = prompt.shape[1]
    cache = model.new_cache(1, T + n)
    logits = model(prompt, torch.arange(T), cache)[:, -1]
    out = []
    for i in range(n):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        if i + 1 < n:
            logits = model(torch.tensor([[nxt]]), torch.tensor([T + i]), cache)[:, -1]
    return out


@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_greedy_64_tokens_identical(folders, cfg_name):
    hf = hf_fp32(folders, cfg_name, "packed")
    prompt = tokens(cfg_name, batch=1, length=7, seed=3)
    hf.generation_config.eos_token_id = None  # run all 64 steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    ours = checkpoint.load(folders(cfg_name, "packed"), dtype=torch.float32)
    assert len(ref) == 64
    assert greedy(ours, prompt, 64) == ref


@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_cached_decode_matches_reference_every_position(folders, cfg_name):
    t = tokens(cfg_name, batch=2, length=24, seed=4)
    ref = hf_fp32(folders, cfg_name, "packed")(t).logits
    ours = checkpoint.load(folders(cfg_name, "packed"), dtype=torch.float32)
    first = assert_fp32_parity(ours, hf_fp32(folders, cfg_name, "packed"), t)  # rows comparable
    cache = ours.new_cache(2, 32)
    with _recording(ours) as steps:
        outs = [ours(t[:, :5], torch.arange(5), cache)]
        for i in range(5, 24):
            outs.append(ours(t[:, i:i + 1], torch.tensor([i]), cache))
    dec = torch.cat(outs, 1)
    with _recording(ours) as full_in:
        full = ours(t)
    # cache == full forward at every position up to a row's first int8 flip on a rounding tie
    # (attention sums in another order: seen on an AVX2-only CPU, one flip at position 22 of 24)
    n = len(full_in)
    dec_in = [(name, torch.cat([steps[j][1] for j in range(i, len(steps), n)], 1))
              for i, (name, _) in enumerate(full_in)]
    cached_first = _first_flips(dec_in, full_in, *t.shape)
    assert sum(cached_first) >= 0.5 * t.numel(), f"activation flips too early to compare: {cached_first}"
    for r, p in enumerate(cached_first):
        if p:
            assert (dec[r, :p] - full[r, :p]).abs().max().item() <= FP32_TOL
    for r, p in enumerate(first):
        p = min(p, cached_first[r])
        if p:
            assert (dec[r, :p] - ref[r, :p]).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg_name", ["parity-gqa2", "parity-gqa4"])
@torch.no_grad()
def test_our_save_loads_in_transformers(tmp_path, cfg_name, layout):
    model = random_model(cfg_name, seed=7, attn_impl="eager")  # BitLinear latents, fp32
    folder = checkpoint.save(model, tmp_path / "m", layout=layout,
                             spelling="v5" if layout == "bitlinear" else "v4")
    t = tokens(cfg_name, seed=5)
    hf = hf_load(folder)
    if layout == "master":
        expect = model  # bf16-exact latents: the master layout is lossless
    else:  # packed: the file holds gamma rounded to bf16 (bitlinear: 1/gamma rounded)
        expect = copy.deepcopy(model).pack()
        for _, mod in expect.projections():
            g = mod.weight_scale.double()
            s = (g if layout == "packed" else 1.0 / g).to(torch.bfloat16).double()
            mod.weight_scale.copy_(s if layout == "packed" else 1.0 / s)
            mod.invalidate()
    assert_fp32_parity(expect, hf, t)
