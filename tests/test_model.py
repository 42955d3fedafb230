"""Model structure and numerics that need no outside reference: KV cache, packing, segments."""

import torch

from bitnet158.config import ModelConfig
from bitnet158.model import Transformer, init_weights


def _model(packed=True, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", dtype="float32", **kw)
    m = init_weights(Transformer(cfg)).eval()
    return m.pack() if packed else m


def test_parameter_names_follow_checkpoint():
    names = set(_model().state_dict())
    for n in ("model.embed_tokens.weight", "model.norm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale",
              "model.layers.1.self_attn.attn_sub_norm.weight", "model.layers.1.mlp.ffn_sub_norm.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert n in names, n
    assert "lm_head.weight" not in names


def test_train_and_packed_forward_agree():
    m = _model(packed=False)
    t = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a = m(t)
        b = m.pack()(t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_kv_cache_matches_full_forward_every_position():
    m = _model(num_attention_heads=4, num_key_value_heads=1)
    m.attn_impl = "eager"
    t = torch.randint(0, 512, (2, 20))
    full = m(t)
    cache = m.new_cache(2, 32)
    outs = [m(t[:, :7], torch.arange(7), cache)]
    for i in range(7, 20):
        outs.append(m(t[:, i:i + 1], torch.tensor([i]), cache))
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-4


@torch.no_grad()
def test_rows_at_different_positions():
    m = _model()
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    ref_a, ref_b = m(a)[0, -1], m(b)[0, -1]
    cache = m.new_cache(2, 16)
    # prefill each row separately into the shared cache, then decode both in one step
    tokens = torch.zeros(2, 9, dtype=torch.long)
    tokens[0, :5], tokens[1] = a[0], b[0]
    pos = torch.stack([torch.arange(9).clamp(max=4), torch.arange(9)])
    m(tokens[:, :4], pos[:, :4], cache)
    out = m(torch.stack([a[0, 4:5], b[0, 4:5]]), torch.tensor([[4], [4]]), cache)
    torch.testing.assert_close(out[0, -1], ref_a, rtol=1e-4, atol=1e-4)
    out = m(b[:, 5:9].expand(2, 4), torch.tensor([[5, 6, 7, 8]]).expand(2, 4), cache)
    torch.testing.assert_close(out[1, -1], ref_b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_segments_do_not_attend_across():
    m = _model()
    a, b = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 6 + [1] * 5])
    out = m(packed, segment_ids=seg)
    torch.testing.assert_close(out[:, :6], m(a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 6:], m(b), rtol=1e-4, atol=1e-4)
