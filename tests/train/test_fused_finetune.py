"""SFT and DPO on the fused path (``model.fused = true`` / ``--fused``): fused BitLinear blocks, the fused
head loss (SFT, summed or mean, assistant-only labels of multi-turn conversations) and the chunked
log-probs through the row kernel (DPO), against the reference classes with the chunked head and
against full logits: values and every gradient within 1e-5 (fp32); DPO rewards exactly 0 at step 0;
``bitnet158 sft/dpo --fused`` runs give the reference runs' losses (with activation checkpointing too).

    python3 -m pytest -q tests/train/test_fused_finetune.py
"""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.kernels.bitlinear_train import use_fused_bitlinear  # noqa: E402
from bitnet158.kernels.norm_bitlinear import FusedBlock  # noqa: E402
from bitnet158.model import Transformer, init_weights  # noqa: E402
from bitnet158.train import dpo, losses, sft  # noqa: E402
from bitnet158.train.dpo_data import encode_pairs  # noqa: E402
from bitnet158.train.head_loss import HeadLoss  # noqa: E402
from bitnet158.train.sft_data import IGNORE, encode_records, pack_examples  # noqa: E402

WORDS = "bread flour water salt yeast oven warm dough rise bake slice butter".split()


def _triton_ok() -> bool:
    try:
        from bitnet158.kernels.triton import common
        return torch.cuda.is_available() or common.INTERPRET
    except ImportError:
        return False


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", dtype="float32", quantization_mode="online", hidden_size=32,
                                intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                num_hidden_layers=2)
    return init_weights(Transformer(cfg, attn_impl="eager"), std=0.05)


def _fused(model, backend, monkeypatch):
    """A fused copy of ``model`` (same weights) on ``backend``; the row kernel follows it."""
    m = copy.deepcopy(model)
    assert use_fused_bitlinear(m, backend=backend) > 0
    assert any(isinstance(b, FusedBlock) for b in m.modules())
    monkeypatch.setattr(losses, "FORCE_TRITON", backend == "triton")
    return m


def _close(a, b, tol=1e-5):
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def _assert_grads(got, want, tol=1e-5):
    for (n, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
        scale = max(1e-3, q.grad.abs().max().item())
        assert (p.grad - q.grad).abs().max().item() <= tol * scale, n


# ---------------------------------------------------------------- SFT

def _sft_batch(enc, n=9, seq_len=128, rows=3):
    """Packed rows of multi-turn conversations (system + 1-3 assistant turns): labels only on the
    assistant tokens and their <|eot_id|>, several segments per row."""
    recs = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for t in range(1 + i % 3):
            msgs += [{"role": "user", "content": " ".join(WORDS[(i + t + k) % 12] for k in range(2 + t))},
                     {"role": "assistant", "content": " ".join(WORDS[(3 * i + k) % 12] for k in range(1 + (i + t) % 4))}]
        recs.append({"messages": msgs})
    exs, _ = encode_records(recs, enc, max_len=seq_len)
    packed = pack_examples(exs, seq_len=seq_len, pad_id=1, seed=0)
    t, lab, seg = (torch.from_numpy(x[:rows]) for x in (packed.tokens, packed.labels, packed.segments))
    assert (seg.amax(1) >= 2).any() and (lab != IGNORE).sum(1).min() > 0   # packed rows, targets in each
    return t, lab, seg, torch.tensor(int((lab != IGNORE).sum()))


@pytest.mark.parametrize("backend,reduction", [("torch", "sum"), ("torch", "mean"), pytest.param(
    "triton", "sum", marks=pytest.mark.skipif(not _triton_ok(), reason="Triton not usable"))])
def test_fused_sft_loss_and_grads_equal_reference(enc, backend, reduction, monkeypatch):
    batch = _sft_batch(enc, rows=3 if backend == "torch" else 1)     # the Triton interpreter is slow
    ref = _model(1)
    full = copy.deepcopy(ref)
    fused = _fused(ref, backend, monkeypatch)
    loss_fn = sft.make_loss_fn(reduction, grad_accum=1, chunk=16)
    want, wm = loss_fn(HeadLoss(ref, "ce", head="chunked", reduction="sum", chunk=16), batch)
    got, gm = loss_fn(HeadLoss(fused, "ce", head="fused", reduction="sum", chunk=16), batch)
    assert losses.LAST_CHUNKS.backward == [] and losses.LAST_CHUNKS.chunk_tokens == 16   # made once
    V, n_tok = ref.config.vocab_size, batch[0].numel()
    assert losses.LAST_CHUNKS.max_elems <= 16 * V < n_tok * V                            # never [B, T, V]
    # full logits, the assistant-only mask applied by hand
    t, lab, seg, n = batch
    nll = F.cross_entropy(full(t, segment_ids=seg).flatten(0, 1), lab.clamp(min=0).flatten(), reduction="none")
    naive = (nll * (lab.flatten() != IGNORE)).sum()
    naive = naive if reduction == "sum" else naive / n
    assert _close(want, naive) and _close(got, want), (float(got), float(want), float(naive))
    assert gm["tokens"] == wm["tokens"] == int(n) and _close(gm["nll_per_token"], wm["nll_per_token"])
    (got * 1.3).backward()
    (want * 1.3).backward()
    (naive * 1.3).backward()
    _assert_grads(fused, ref)
    _assert_grads(ref, full)


def test_fused_sft_eval_without_grad_equals_reference(enc, monkeypatch):
    t, lab, seg, _ = _sft_batch(enc)
    ref = _model(2)
    fused = _fused(ref, "torch", monkeypatch)
    with torch.no_grad():
        a = sft.summed_ce(HeadLoss(fused, "ce", head="fused", reduction="sum"), t, lab, seg)
        b = sft.summed_ce(HeadLoss(ref, "ce", head="chunked", reduction="sum"), t, lab, seg)
    assert _close(a, b)


# ---------------------------------------------------------------- DPO

def _pairs(enc, n=4):
    recs = []
    for i in range(n):
        q = " ".join(WORDS[(i + k) % 12] for k in range(2 + i % 3))
        recs.append({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": f"How {q}?"}],
                     "chosen": " ".join(WORDS[i:i + 4]) + ".", "rejected": " ".join(WORDS[::-1][i:i + 2 + i % 3])})
    pairs, _ = encode_pairs(recs, enc, max_len=64)
    return pairs


@pytest.mark.parametrize("backend", ["torch"])     # Triton: tests/train/test_fused_losses.py, tests/kernels
def test_fused_dpo_equals_reference_and_rewards_zero_at_step_zero(enc, backend, monkeypatch):
    pairs = _pairs(enc)
    batch = dpo.make_batch(pairs, [0, 1, 2, 3], pad_id=1, device=torch.device("cpu"))
    # (a seed whose 1e-7 float differences between the paths flip no activation integer: a flip, one
    # quantization step somewhere, is a legitimate difference of a quantized function, not a bug)
    start = _model(1)
    ref_ref = HeadLoss(copy.deepcopy(start).eval().requires_grad_(False), "logps", chunk=8)
    fused_ref = HeadLoss(_fused(start, backend, monkeypatch).eval().requires_grad_(False), "logps", head="fused",
                         chunk=8)
    # step 0: the fused policy is its fused reference -> every reward exactly 0, loss log 2
    policy0 = HeadLoss(_fused(start, backend, monkeypatch), "logps", head="fused", chunk=8)
    loss, m = dpo.make_loss_fn(0.1, 0.0, 1, ref_model=fused_ref, chunk=8)(policy0, batch)
    assert m["rewards_chosen"].item() == 0.0 and m["rewards_rejected"].item() == 0.0 and m["margin"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    # a moved policy: fused (blocks + row kernel) against the reference classes, same weights
    moved = copy.deepcopy(start)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    pol_ref = HeadLoss(moved, "logps", chunk=8)
    pol_fused = HeadLoss(_fused(moved, backend, monkeypatch), "logps", head="fused", chunk=8)
    want, wm = dpo.make_loss_fn(0.1, 0.0, 1, ref_model=ref_ref, chunk=8)(pol_ref, batch)
    got, gm = dpo.make_loss_fn(0.1, 0.0, 1, ref_model=fused_ref, chunk=8)(pol_fused, batch)
    assert losses.LAST_CHUNKS.max_elems <= 8 * start.config.vocab_size       # never [B, T, V]
    assert wm["margin"].item() != 0.0
    assert _close(got, want)
    for k in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        assert abs(gm[k].item() - wm[k].item()) <= 1e-5 * max(1e-2, abs(wm[k].item())), k
    got.backward()
    want.backward()
    _assert_grads(pol_fused.net, pol_ref.net)


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def start_run(tmp_path_factory, shards_dir):
    from conftest import chat_data, ft_recipe, pref_data, pretrain_start
    d = tmp_path_factory.mktemp("fusedft")
    pretrain_start(d, shards_dir, steps=6)
    chat_data(d / "chat.jsonl", 24, 0)
    pref_data(d / "pref.jsonl", 24, 1)
    sft_r = ft_recipe(d / "sft.toml", d / "pre", [d / "chat.jsonl"],
                       'seq_len = 64\nepochs = 1\nval_fraction = 0.15\nloss = "sum"\n', 3, 3e-3)
    dpo_r = ft_recipe(d / "dpo.toml", d / "pre", [d / "pref.jsonl"],
                       "max_len = 64\nepochs = 1\nval_fraction = 0.2\nbeta = 0.1\n", 3, 2e-3)
    return d, sft_r, dpo_r


def _cli(stage, recipe, out, *extra):
    from bitnet158 import cli
    assert cli.main([stage, str(recipe), "--out", str(out), "--device", "cpu", *extra]) == 0
    from bitnet158.train.loop import read_log
    return read_log(out / "log.jsonl"), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fused_command_matches_reference_run(start_run, tmp_path, stage):
    d, sft_r, dpo_r = start_run
    recipe = sft_r if stage == "sft" else dpo_r
    log_ref, s_ref = _cli(stage, recipe, tmp_path / "ref")
    log_fused, s_fused = _cli(stage, recipe, tmp_path / "fused", "--fused")
    log_ckpt, _ = _cli(stage, recipe, tmp_path / "ckpt", "--fused", "--set", "train.activation_checkpointing=true")
    assert s_fused["fused"] is True and s_ref["fused"] is False
    assert (s_fused["head"], s_ref["head"]) == ("fused", "chunked")
    for key in ("loss", "val_loss"):
        a, b = [r[key] for r in log_fused if key in r], [r[key] for r in log_ref if key in r]
        assert len(a) == len(b) > 0
        assert [r[key] for r in log_ckpt if key in r] == pytest.approx(a, rel=1e-6)   # recomputed blocks
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-4 * max(abs(y), 1e-3), (stage, key, a, b)
    if stage == "dpo":   # the frozen reference runs the same fused forward: rewards exactly 0 at step 0
        assert s_fused["first_step"]["margin"] == 0.0 and s_fused["first_step"]["rewards_chosen"] == 0.0
        assert s_fused["start"]["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # ordinary checkpoints and exports: the same tensor names as the reference run
    from safetensors.torch import load_file
    ck = "checkpoints/step-00000003/model.safetensors"
    assert load_file(str(tmp_path / "fused" / ck)).keys() == load_file(str(tmp_path / "ref" / ck)).keys()
    assert (tmp_path / "fused" / "hf" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "fused" / "recipe.json").read_text())["model"] == {"fused": True}
