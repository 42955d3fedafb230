"""DPO: pair formats, completion masks, the chunked loss against full logits, zero reward at step 0."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights
from bitnet158.train.dpo import DPOBatches, make_batch, make_loss_fn, reference_table
from bitnet158.train.dpo_data import encode_pairs, pad_pairs, parse_hh, to_pair_messages
from bitnet158.train.losses import LAST_CHUNKS
from bitnet158.train.sft_data import IGNORE, DataError, read_records

REPO = Path(__file__).resolve().parents[2]
PREF = REPO / ".." / "shared" / "data" / "preference"

HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake bread?\n\nAssistant: Mix flour and water.",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake bread?\n\nAssistant: No."}



def _targets(tok, ex):
    return tok.decode([int(y) for y in ex.labels if y != IGNORE])


def test_hh_transcripts_share_the_prompt(tok, enc):
    c, r = to_pair_messages(HH)
    assert [m["role"] for m in c] == ["user", "assistant", "user", "assistant"]
    assert c[:3] == r[:3] and c[3]["content"] == "Mix flour and water."
    (pair,), stats = encode_pairs([HH], enc, max_len=256)
    assert _targets(tok, pair.chosen) == "Mix flour and water.<|eot_id|>"   # not the earlier 'hello'
    assert _targets(tok, pair.rejected) == "No.<|eot_id|>"
    # identical prompts -> identical prefixes up to the completion
    n = min(len(pair.chosen), len(pair.rejected))
    first = next(i for i in range(n) if pair.chosen.labels[i] != IGNORE)
    assert list(pair.chosen.tokens[:first + 1]) == list(pair.rejected.tokens[:first + 1])
    with pytest.raises(DataError, match="HH-RLHF"):
        parse_hh("Human: no leading blank line", "x")


def test_other_pair_formats(tok, enc):
    recs = [
        {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
        {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "yes"},
         "rejected": {"from": "gpt", "value": "no"}},
        {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}]},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},
    ]
    pairs, stats = encode_pairs(recs, enc, max_len=64)
    assert stats["dropped_equal"] == 1 and len(pairs) == 4
    for p in pairs:
        assert list(p.chosen.tokens) == list(pairs[0].chosen.tokens)
        assert _targets(tok, p.chosen) == "yes<|eot_id|>" and _targets(tok, p.rejected) == "no<|eot_id|>"
    with pytest.raises(DataError, match=r"data\[0\]: a preference record needs"):
        encode_pairs([{"prompt": "x", "chosen": "y"}], enc, 64)
    long_pair, _ = encode_pairs([{"prompt": "Q?", "chosen": "a much longer answer", "rejected": "no"}], enc, 64)
    tokens, labels = pad_pairs([pairs[0]] + long_pair, pad_id=1)
    seqs = [pairs[0].chosen, long_pair[0].chosen, pairs[0].rejected, long_pair[0].rejected]
    assert tokens.shape == (4, max(len(x) for x in seqs))
    for row, ex in zip(range(4), seqs):
        assert list(tokens[row, :len(ex)]) == list(ex.tokens)
        assert (labels[row, len(ex):] == IGNORE).all() and (tokens[row, len(ex):] == 1).all()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", dtype="float32", quantization_mode="online", hidden_size=32,
                                intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Transformer(cfg), std=0.05)


def _pairs(enc, n=6):
    words = "bread flour water salt yeast oven warm dough rise bake slice butter".split()
    recs = []
    for i in range(n):
        q = " ".join(words[(i + k) % len(words)] for k in range(2 + i % 3))
        recs.append({"prompt": f"How {q}?", "chosen": " ".join(words[i:i + 4]) + ".",
                     "rejected": " ".join(words[::-1][i:i + 2 + i % 4]) + "!"})
    pairs, _ = encode_pairs(recs, enc, max_len=64)
    return pairs


def _naive_dpo(model, ref, tokens, labels, beta):
    """Full [2P, T, V] logits, log_softmax, masked sums."""
    def seq_lp(m):
        lp = torch.log_softmax(m(tokens).float(), -1)
        mask = labels != IGNORE
        return (lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)
    pol = seq_lp(model)
    with torch.no_grad():
        rf = seq_lp(ref)
    P = tokens.shape[0] // 2
    margin = beta * ((pol[:P] - rf[:P]) - (pol[P:] - rf[P:]))
    return -F.logsigmoid(margin).mean()


def test_dpo_loss_and_grads_equal_naive_and_reward_zero_at_step_zero(enc):
    pairs = _pairs(enc)
    policy = _tiny_model()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = make_batch(pairs, [0, 1, 2, 3], pad_id=1, device=torch.device("cpu"))
    loss_fn = make_loss_fn(beta=0.1, smoothing=0.0, grad_accum=1, ref_model=ref, chunk=8)
    loss, m = loss_fn(policy, batch)
    # step 0: the policy is the reference -> every reward exactly 0, loss exactly log 2
    assert m["rewards_chosen"].item() == 0.0 and m["rewards_rejected"].item() == 0.0
    assert m["margin"].item() == 0.0 and loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert LAST_CHUNKS.chunk_tokens == 8
    B, T = batch[0].shape
    V = policy.config.vocab_size
    assert LAST_CHUNKS.max_elems <= 8 * V < B * T * V            # never [B, T, V]
    assert all(r <= 8 and v == V for r, v in LAST_CHUNKS.forward)
    # move the policy away from the reference, then compare values and gradients with full logits
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    naive_model = copy.deepcopy(policy)
    loss, m = loss_fn(policy, batch)
    ref_loss = _naive_dpo(naive_model, ref, batch[0], batch[1], 0.1)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert m["margin"].item() != 0.0
    loss.backward()
    ref_loss.backward()
    for (n, p), q in zip(policy.named_parameters(), naive_model.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5, n
    assert LAST_CHUNKS.backward and all(r <= 8 for r, _ in LAST_CHUNKS.backward)


def test_precomputed_reference_matches_on_the_fly(enc):
    pairs = _pairs(enc, n=5)
    policy = _tiny_model(3)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    table = reference_table(ref, pairs, micro_batch=2, pad_id=1, device=torch.device("cpu"), amp_dtype="fp32")
    assert table.shape == (5, 2) and (table < 0).all()
    batch = make_batch(pairs, [4, 0, 2], pad_id=1, device=torch.device("cpu"))
    on_the_fly = make_loss_fn(0.1, 0.0, 1, ref_model=ref)(policy, batch)
    pre = make_loss_fn(0.1, 0.0, 1, ref_table=table)(policy, batch)
    assert abs(on_the_fly[0].item() - pre[0].item()) <= 1e-6
    assert abs(pre[1]["margin"].item()) <= 1e-4                   # 0 up to float rounding


def test_dpo_batches_cover_pairs_and_resume(enc):
    pairs = _pairs(enc, n=5)
    a = DPOBatches(pairs, 2, 1, seed=0, device=torch.device("cpu"))
    idx = [a.next_batch(i)[2].tolist() for i in range(5)]       # 10 pairs = 2 epochs
    assert sorted(sum(idx[:2], []) + idx[2][:1]) == list(range(5))
    state = a.state_dict()
    nxt = a.next_batch(5)
    b = DPOBatches(pairs, 2, 1, seed=0, device=torch.device("cpu"))
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(nxt, b.next_batch(5)))


@pytest.mark.skipif(not PREF.is_dir(), reason="../shared/data not present")
def test_shared_preference_files_parse(tok, enc):
    hh = read_records(PREF / "hh-rlhf-harmless-base" / "test.jsonl")[:20]
    pairs, stats = encode_pairs(hh, enc, max_len=4096)
    assert len(pairs) == 20 and stats["dropped_equal"] == 0
    lf = read_records(PREF / "llamafactory-demo" / "dpo_en_demo.json")[:10]
    pairs, stats = encode_pairs(lf, enc, max_len=8192)
    assert len(pairs) == 10
    for p in pairs:
        assert _targets(tok, p.chosen).endswith("<|eot_id|>")


def test_long_prompts_lose_their_oldest_tokens_not_the_completion(tok, enc):
    rec = {"prompt": "the old mill by the river " * 20, "chosen": "Bake bread.", "rejected": "No!"}
    (pair,), stats = encode_pairs([rec], enc, max_len=40)
    assert stats["truncated"] == 1
    for ex, text in ((pair.chosen, "Bake bread.<|eot_id|>"), (pair.rejected, "No!<|eot_id|>")):
        assert len(ex) <= 40 and ex.tokens[0] == tok.bos_id
        assert _targets(tok, ex) == text                               # the whole completion is kept
        assert "Assistant: " in tok.decode(ex.tokens.tolist())
