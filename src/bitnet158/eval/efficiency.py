"""Efficiency report of a model: resident memory, load time, prefill/decode latency, energy per token.

    e = energy_per_token(model.config, context=512, zero_fraction=ternary_zero_fraction(model))
    e["bitnet_pj"], e["fp16_pj"], e["ratio"]                 # arithmetic energy of one decoded token
    m = measure_latency(model, prompt_tokens=128, gen_tokens=32)   # runner prefill / decode timings
    bitnet158 bench MODEL                                    # table + one JSON line (+ PNG charts)

Energy method (the one of the BitNet papers and the 2B4T report): count the arithmetic operations
of one decoded token by type and multiply by a per-operation energy for a 7 nm process. Memory
traffic, norms, softmax, RoPE and activation functions are not counted (they are O(hidden) per
token). What is counted, per token at a context of ``L`` tokens:

- BitLinear projections (q, k, v, o, gate, up, down; ``K x N`` each): ternary weights times int8
  activations = ``K*N`` int8 additions (a +-1 weight adds or subtracts; with ``skip_zeros`` the
  zero weights are skipped, using the model's measured fraction of zeros), plus ``K`` fp16
  multiplications to quantize the input and ``N`` to rescale the output.
  The FP16 baseline of the same shape does ``K*N`` fp16 multiplications and ``K*N`` fp16 additions.
- Attention: ``2 * heads * head_dim * L`` fp16 multiply-adds (scores and weighted sum), both models.
- Head (``hidden x vocab``, not quantized): ``D*V`` fp16 multiply-adds, both models.

Energies in pJ per operation at 7 nm (:data:`ENERGY_PJ_7NM`) are those of Table 2 of Wang et al.,
"BitNet: Scaling 1-bit Transformers for Large Language Models" (2023), which derives them from
Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014 (45 nm), scaled to
7 nm as in Zhang et al., "PokeBNN" (CVPR 2022); "The Era of 1-bit LLMs" (2024) and the BitNet
b1.58 2B4T report (2025) use the same model. An fp16 multiply-add costs 0.34 + 0.16 = 0.50 pJ
against 0.007 pJ for an int8 add: the 71.4x matmul-arithmetic saving those papers quote.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

ENERGY_PJ_7NM = {"int8_add": 0.007, "int8_mul": 0.07, "fp16_add": 0.16, "fp16_mul": 0.34,
                 "fp32_add": 0.38, "fp32_mul": 1.31}
ENERGY_SOURCE = ("7 nm per-operation energies of Wang et al. 2023 (BitNet, Table 2), from Horowitz "
                 "ISSCC 2014 scaled to 7 nm as in Zhang et al. 2022 (PokeBNN); method of the BitNet "
                 "b1.58 papers and the 2B4T report: arithmetic energy only, memory traffic not counted")


# ---------------------------------------------------------------- energy model

def projection_shapes(cfg) -> list[tuple[int, int]]:
    """(in K, out N) of every BitLinear of one layer."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def ternary_zero_fraction(model) -> float | None:
    """Fraction of zero weights over all packed projections (None for an unpacked model)."""
    from ..layers import PackedLinear
    zeros = total = 0
    for _, mod in model.projections():
        if not isinstance(mod, PackedLinear):
            return None
        w = mod.weight                                                    # uint8 [N/4, K], w+1 per field
        for k in range(4):
            zeros += int(((w >> (2 * k)) & 3).eq(1).sum())
        total += w.numel() * 4
    return zeros / total if total else None


def op_counts(cfg, context: int = 512, zero_fraction: float | None = None, skip_zeros: bool = False) -> dict:
    """Operations of one decoded token at ``context`` tokens, by type, for BitNet and an fp16 twin."""
    L = cfg.num_hidden_layers
    kn = sum(k * n for k, n in projection_shapes(cfg)) * L               # ternary weights
    io = sum(k + n for k, n in projection_shapes(cfg)) * L               # quantize in / rescale out
    adds = kn * (1 - zero_fraction) if skip_zeros and zero_fraction is not None else kn
    attn = 2 * cfg.num_attention_heads * cfg.head_dim * context * L      # multiply-adds
    head = cfg.hidden_size * cfg.vocab_size                              # multiply-adds
    return {
        "bitnet": {"int8_add": adds, "fp16_mul": io + attn + head, "fp16_add": attn + head},
        "fp16": {"fp16_mul": kn + attn + head, "fp16_add": kn + attn + head},
        "parts": {"projection_weights": kn, "attention_macs": attn, "head_macs": head},
    }


def energy_per_token(cfg, context: int = 512, zero_fraction: float | None = None,
                     skip_zeros: bool = False, table: dict | None = None) -> dict:
    """Arithmetic energy (pJ) of one decoded token for the model and an fp16 model of the same shape."""
    e = table or ENERGY_PJ_7NM
    ops = op_counts(cfg, context, zero_fraction, skip_zeros)

    def total(counts: dict) -> float:
        return sum(v * e[k] for k, v in counts.items())

    p = ops["parts"]
    bit_mm = p["projection_weights"] * (1 - zero_fraction if skip_zeros and zero_fraction else 1) * e["int8_add"]
    fp_mm = p["projection_weights"] * (e["fp16_mul"] + e["fp16_add"])
    shared = (p["attention_macs"] + p["head_macs"]) * (e["fp16_mul"] + e["fp16_add"])
    bit, fp = total(ops["bitnet"]), total(ops["fp16"])
    return {
        "context": context, "zero_fraction": zero_fraction, "skip_zeros": skip_zeros,
        "ops": ops, "energy_pj_per_op": dict(e), "source": ENERGY_SOURCE,
        "bitnet_pj": bit, "fp16_pj": fp, "ratio": fp / bit if bit else float("nan"),
        "bitnet_matmul_pj": bit_mm, "fp16_matmul_pj": fp_mm,
        "matmul_ratio": fp_mm / bit_mm if bit_mm else float("nan"),
        "attention_head_pj": shared,
    }


# ---------------------------------------------------------------- measurements

def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # noqa: PLC0415 (only off Linux)
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return rss_bytes()


def model_bytes(model) -> dict:
    """Bytes held by the model: packed projections, scales, embeddings/head, norms."""
    packed = other = 0
    for t in [*model.parameters(), *model.buffers()]:
        n = t.numel() * t.element_size()
        if t.dtype == torch.uint8:
            packed += n
        else:
            other += n
    head = model.head_weight
    return {"packed_bytes": packed, "float_bytes": other,
            "head_bytes": head.numel() * head.element_size(), "total_bytes": packed + other}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model, prompt_tokens: int = 128, gen_tokens: int = 32, repeats: int = 3,
                    backend: str = "auto", seed: int = 0) -> dict:
    """Prefill time of a ``prompt_tokens`` prompt and per-token decode time (median over repeats)."""
    from ..engine import make_runner
    cfg = model.config
    prompt_tokens = max(1, min(prompt_tokens, cfg.max_position_embeddings - gen_tokens - 1))
    runner = make_runner(model, batch=1, max_len=prompt_tokens + gen_tokens + 1, backend=backend)
    dev = runner.device
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=g).to(dev)
    pos = torch.arange(prompt_tokens, device=dev)[None]
    prefill, decode = [], []
    for rep in range(repeats + 1):                                     # the first run warms up
        _sync(dev)
        t0 = time.perf_counter()
        logits = runner.prefill(toks, pos)
        _sync(dev)
        t1 = time.perf_counter()
        tok = logits.argmax(-1)                                        # [1]
        steps = []
        for i in range(gen_tokens):
            s0 = time.perf_counter()
            logits = runner.decode(tok, torch.tensor([prompt_tokens + i]))   # position from the host
            tok = logits.argmax(-1)
            _sync(dev)
            steps.append(time.perf_counter() - s0)
        if rep:
            prefill.append(t1 - t0)
            decode.append(statistics.median(steps))
    pp, tg = statistics.median(prefill), statistics.median(decode)
    return {"runner": getattr(runner, "name", type(runner).__name__), "device": str(dev),
            "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "prefill_ms": pp * 1e3, "prefill_tok_s": prompt_tokens / pp,
            "decode_ms_per_token": tg * 1e3, "decode_tok_s": 1.0 / tg}


def charts(report: dict, out_dir, prefix: str = "bench") -> list[str]:
    """PNG charts (energy per token by op type; latency) if matplotlib is installed; returns paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    e = report["energy"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["BitNet b1.58", "FP16 same shape"]
    mm = [e["bitnet_matmul_pj"] / 1e6, e["fp16_matmul_pj"] / 1e6]
    rest = [(e["bitnet_pj"] - e["bitnet_matmul_pj"]) / 1e6, (e["fp16_pj"] - e["fp16_matmul_pj"]) / 1e6]
    ax.bar(labels, mm, label="projections (int8 add / fp16 mul+add)")
    ax.bar(labels, rest, bottom=mm, label="head + attention (+ quant/rescale), fp16")
    ax.set_ylabel(f"µJ per token (context {e['context']})")
    ax.set_title("Arithmetic energy per decoded token, 7 nm")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"{prefix}-energy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(str(p))
    lat = report.get("latency", [])
    if lat:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{m['device']}/{m['runner']}" for m in lat]
        ax.bar([n + " prefill" for n in names], [m["prefill_tok_s"] for m in lat])
        ax.bar([n + " decode" for n in names], [m["decode_tok_s"] for m in lat])
        ax.set_ylabel("tokens / s")
        ax.set_title("Throughput (batch 1)")
        fig.tight_layout()
        p = out / f"{prefix}-latency.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))
    return paths


__all__ = ["ENERGY_PJ_7NM", "ENERGY_SOURCE", "op_counts", "energy_per_token", "ternary_zero_fraction",
           "projection_shapes", "rss_bytes", "peak_rss_bytes", "model_bytes", "measure_latency", "charts"]
