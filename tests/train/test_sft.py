"""SFT data and loss: record formats, assistant-only label masks, packing that never crosses examples."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights
from bitnet158.train.sft import SFTBatches, make_loss_fn
from bitnet158.train.sft_data import (IGNORE, DataError, encode_records, make_example, pack_examples,
                                      read_records, to_messages)

REPO = Path(__file__).resolve().parents[2]
SFT_DATA = REPO / ".." / "shared" / "data" / "sft"

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! Fine <|eot_id|> thanks."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "  Bye now.  "}]



def _spans(mask):
    """[(start, end)] of the True runs of a bool list."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_multi_turn_label_mask_covers_assistant_tokens_and_their_eot(tok, enc):
    ids, target = enc.encode(CONV)
    assert tok.eot_id == 4 and ids[0] == tok.bos_id == 0 and ids.count(tok.bos_id) == 1
    spans = _spans(target)
    assert len(spans) == 2                                  # one run per assistant turn
    a, b = (tok.decode(ids[s:e]) for s, e in spans)
    assert a == "Hello! Fine <|eot_id|> thanks.<|eot_id|>"  # literal text, then the real eot
    assert b == "Bye now.<|eot_id|>"                         # the template trims the content
    for s, e in spans:
        assert ids[e - 1] == tok.eot_id and target[e - 1]
    # the literal '<|eot_id|>' inside the content is text, not the special token
    assert [i for i in ids[spans[0][0]:spans[0][1]] if i == tok.eot_id] == [tok.eot_id]
    # what precedes each assistant turn is exactly the inference prompt (ends with 'Assistant: ')
    assert ids[:spans[0][0]] == tok.encode_chat(CONV[:2], add_generation_prompt=True)
    assert tok.decode(ids[:spans[1][0]]) == tok.render_chat(CONV[:4], add_generation_prompt=True)
    assert tok.decode(ids[:spans[0][0]]).endswith("Assistant: ")
    # nothing else is a target: system, user turns, headers
    assert sum(target) == sum(e - s for s, e in spans)
    # train_from: only assistant turns at or after that message index
    ids2, t2 = enc.encode(CONV, train_from=3)
    assert ids2 == ids and _spans(t2) == [spans[1]]


def test_make_example_shifts_labels(tok, enc):
    ids, target = enc.encode(CONV[:3])
    ex = make_example(ids, target)
    assert np.array_equal(ex.tokens, ids[:-1])
    for t in range(len(ex)):
        assert ex.labels[t] == (ids[t + 1] if target[t + 1] else IGNORE)
    assert ex.n_targets == sum(target)
    short = make_example(ids, target, max_len=5)               # truncated before any target
    assert short is None


def test_record_formats():
    m = to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert [x["role"] for x in m] == ["user", "assistant"]
    m = to_messages({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "a"}]})
    assert [x["role"] for x in m] == ["system", "user", "assistant"]
    m = to_messages({"instruction": "Translate", "input": "chat", "output": "cat"}, system="Sys")
    assert m == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Translate\n\nchat"},
                 {"role": "assistant", "content": "cat"}]
    m = to_messages({"instruction": "Do", "input": "", "output": "done"})
    assert m[0]["content"] == "Do"
    m = to_messages({"instruction": "Do", "instances": [{"input": "x", "output": "y"}]})
    assert m[1]["content"] == "y" and m[0]["content"] == "Do\n\nx"
    m = to_messages({"prompt": "P", "response": "R"})
    assert m == [{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}]
    with pytest.raises(DataError, match=r"file.jsonl\[3\]: unknown record format"):
        to_messages({"text": "x"}, where="file.jsonl[3]")
    with pytest.raises(DataError, match="unknown role"):
        to_messages({"conversations": [{"from": "narrator", "value": "x"}]})


def test_read_records_json_and_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "q", "response": "s"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    (tmp_path / "c.jsonl").write_text('{"prompt": "p"}\n{oops\n')
    assert len(read_records(tmp_path / "a.jsonl")) == 2
    assert len(read_records(tmp_path / "b.json")) == 1
    with pytest.raises(DataError, match=r"c.jsonl:2: not valid JSON"):
        read_records(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.json")


def _examples(enc, n=9, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat and ran far away from home quickly".split()
    recs = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, 8)))
        a = " ".join(rng.choice(words, rng.integers(1, 12)))
        recs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    exs, stats = encode_records(recs, enc, max_len=60)
    assert len(exs) == n and stats["dropped"] == 0
    return exs


def test_packing_never_splits_or_mixes_examples(enc):
    exs = _examples(enc, n=25)
    rows = pack_examples(exs, seq_len=64, pad_id=1, seed=3)
    assert len(rows) < len(exs)                                 # several examples per row
    seen = []
    for r in range(len(rows)):
        seg = rows.segments[r]
        for s in np.unique(seg[seg > 0]):
            pos = np.nonzero(seg == s)[0]
            assert np.array_equal(pos, np.arange(pos[0], pos[-1] + 1))    # contiguous
            seen.append((tuple(rows.tokens[r, pos]), tuple(rows.labels[r, pos])))
        pad = seg == 0
        assert (rows.labels[r, pad] == IGNORE).all() and (rows.tokens[r, pad] == 1).all()
        assert not pad[:int(np.argmax(pad))].any() if pad.any() else True  # padding only at the end
    assert sorted(seen) == sorted((tuple(e.tokens), tuple(e.labels)) for e in exs)
    unpacked = pack_examples(exs, seq_len=64, pad_id=1, seed=3, pack=False)
    assert len(unpacked) == len(exs)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", dtype="float32", quantization_mode="online", hidden_size=32,
                                intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Transformer(cfg, attn_impl="eager"), std=0.05)


def test_packed_row_logits_equal_each_example_alone(enc):
    exs = _examples(enc, n=8, seed=1)
    rows = pack_examples(exs, seq_len=64, pad_id=1, seed=0)
    model = _tiny_model().eval()
    t = torch.from_numpy(rows.tokens)
    seg = torch.from_numpy(rows.segments)
    with torch.no_grad():
        packed = model(t, segment_ids=seg)
        for r in range(len(rows)):
            for s in np.unique(rows.segments[r][rows.segments[r] > 0]):
                pos = torch.from_numpy(np.nonzero(rows.segments[r] == s)[0])
                alone = model(t[r, pos][None])[0]
                assert (packed[r, pos] - alone).abs().max().item() <= 1e-4


def test_sft_loss_is_summed_ce_over_targets_and_matches_naive(enc):
    exs = _examples(enc, n=10, seed=2)
    rows = pack_examples(exs, seq_len=64, pad_id=1, seed=0)
    model = _tiny_model(1)
    batch = (torch.from_numpy(rows.tokens[:3]), torch.from_numpy(rows.labels[:3]),
             torch.from_numpy(rows.segments[:3]))
    ref_model = copy.deepcopy(model)
    loss, metrics = make_loss_fn("sum", grad_accum=1, chunk=16)(model, batch)
    logits = ref_model(batch[0], segment_ids=batch[2])
    ref = F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum", ignore_index=IGNORE)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert metrics["tokens"] == int((batch[1] != IGNORE).sum())
    loss.backward()
    ref.backward()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, q.grad.abs().max().item()), n
    mean, _ = make_loss_fn("mean", grad_accum=1)(model, batch)
    assert mean.item() == pytest.approx(ref.item() / metrics["tokens"], rel=1e-5)


def test_sft_batches_resume_and_epochs(enc):
    exs = _examples(enc, n=12, seed=3)
    a = SFTBatches(exs, 64, 3, 1, seed=0, pack=True, device=torch.device("cpu"))
    n_rows = len(a.rows(0))
    first = [a.next_batch(i) for i in range(3)]
    state = a.state_dict()
    rest = [a.next_batch(i) for i in range(3, 3 + n_rows)]
    assert a.epoch >= 1                                         # wrapped into a re-packed epoch
    b = SFTBatches(exs, 64, 3, 1, seed=0, pack=True, device=torch.device("cpu"))
    b.load_state_dict(json.loads(json.dumps(state)))
    for x, y in zip(rest, [b.next_batch(i) for i in range(3, 3 + n_rows)]):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert first[0][0].shape == (3, 64)


@pytest.mark.skipif(not SFT_DATA.is_dir(), reason="../shared/data not present")
def test_shared_sft_files_parse(enc):
    files = sorted(p for p in SFT_DATA.rglob("*.json*") if p.suffix in (".json", ".jsonl"))
    assert len(files) >= 4
    for f in files:
        exs, stats = encode_records(read_records(f)[:10], enc, max_len=512, where=str(f))
        assert exs, f
