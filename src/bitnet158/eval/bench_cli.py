"""``bitnet158 bench MODEL``: memory, load time, prefill/decode latency and energy per token.

    bitnet158 bench path/to/model                        # CPU (and the GPU too when one is present)
    bitnet158 bench path/to/model --prompt-tokens 128 --gen-tokens 64 --charts out/ --out r.json

``rss_gb`` is the resident memory while serving (after the timed decoding): right after loading,
memory-mapped weights are not resident yet, and runners may keep their own weight layout.
Prints a table, then ONE JSON line with flat keys named for quantity and unit (``rss_gb``,
``load_s``, ``cpu_pp_tok_s``, ``cpu_tg_tok_s``, ``energy_bitnet_uj_per_token``, ...). Latencies are
measured on the runner ``--backend`` picks (batch 1, median of ``--repeats`` runs after one warm-up);
the energy is an estimate by operation counts (see :mod:`bitnet158.eval.efficiency` for the method,
constants and sources). Nothing here is a guarantee: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default 128)")
    p.add_argument("--gen-tokens", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--context", type=int, default=512,
                   help="context length at which the attention energy is counted (default 512)")
    p.add_argument("--skip-zeros", action="store_true",
                   help="energy: skip additions for zero weights (default: count every weight)")
    p.add_argument("--backend", default="auto", help="runner (auto, torch, cpu, ...)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU run even if a GPU is present")
    p.add_argument("--charts", default=None, help="write PNG charts to this folder (needs matplotlib)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load, resolve
    from .efficiency import (energy_per_token, measure_latency, model_bytes, peak_rss_bytes, rss_bytes,
                             ternary_zero_fraction, charts)

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve(args.model)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    model = load(folder, dtype=args.dtype, device="cpu")
    load_s = time.perf_counter() - t0
    rss1 = rss_bytes()
    cfg = model.config
    sizes = model_bytes(model)
    zf = ternary_zero_fraction(model)
    lat = [measure_latency(model, args.prompt_tokens, args.gen_tokens, args.repeats, args.backend)]
    rss2 = rss_bytes()
    gpu_load_s = None
    if torch.cuda.is_available() and not args.no_gpu:
        t0 = time.perf_counter()
        gmodel = load(folder, dtype=args.dtype, device="cuda")
        torch.cuda.synchronize()
        gpu_load_s = time.perf_counter() - t0
        lat.append(measure_latency(gmodel, args.prompt_tokens, args.gen_tokens, args.repeats, args.backend))
        lat[-1]["gpu_name"] = torch.cuda.get_device_name()
        lat[-1]["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del gmodel
    args.context = max(1, min(args.context, cfg.max_position_embeddings))
    energy = energy_per_token(cfg, args.context, zf, args.skip_zeros)

    print(f"model {folder}  ({cfg.num_params() / 1e6:.1f} M params, {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, dtype {model.dtype})")
    print(f"{'quantity':<44}{'value':>14}")
    rows = [("load time (s)", f"{load_s:.3f}"),
            ("resident memory before load (GB)", f"{rss0 / 1e9:.3f}"),
            ("resident memory after load (GB, mmap'd)", f"{rss1 / 1e9:.3f}"),
            ("resident memory serving (GB, after decode)", f"{rss2 / 1e9:.3f}"),
            ("  of which model + runner + cache (GB)", f"{(rss2 - rss0) / 1e9:.3f}"),
            ("peak resident memory (GB)", f"{peak_rss_bytes() / 1e9:.3f}"),
            ("packed ternary weights (MB)", f"{sizes['packed_bytes'] / 1e6:.2f}"),
            ("float tensors: embeddings/head/norms (MB)", f"{sizes['float_bytes'] / 1e6:.2f}"),
            ("zero weights (fraction)", f"{zf:.4f}" if zf is not None else "n/a")]
    for m in lat:
        tag = m["device"].split(":")[0]
        rows += [(f"{tag} runner / threads", f"{m['runner']}/{m['threads']}"),
                 (f"{tag} prefill {m['prompt_tokens']} tokens (ms)", f"{m['prefill_ms']:.2f}"),
                 (f"{tag} prefill (tok/s)", f"{m['prefill_tok_s']:.1f}"),
                 (f"{tag} decode (ms/token)", f"{m['decode_ms_per_token']:.3f}"),
                 (f"{tag} decode (tok/s)", f"{m['decode_tok_s']:.2f}")]
    rows += [(f"energy/token BitNet (µJ, ctx {args.context})", f"{energy['bitnet_pj'] / 1e6:.3f}"),
             ("energy/token FP16 same shape (µJ)", f"{energy['fp16_pj'] / 1e6:.3f}"),
             ("  ratio, whole token", f"{energy['ratio']:.2f}x"),
             ("  projections only: BitNet / FP16 (µJ)",
              f"{energy['bitnet_matmul_pj'] / 1e6:.3f}/{energy['fp16_matmul_pj'] / 1e6:.3f}"),
             ("  ratio, projections only", f"{energy['matmul_ratio']:.1f}x")]
    for k, v in rows:
        print(f"{k:<44}{v:>14}")
    e = energy["energy_pj_per_op"]
    print(f"energy method: ops per decoded token x pJ/op at 7 nm (int8 add {e['int8_add']}, fp16 add "
          f"{e['fp16_add']}, fp16 mul {e['fp16_mul']}); ternary matmul = int8 adds, head and attention = "
          f"fp16 mul+add. Source: {energy['source']}.")

    result = {"model": str(folder), "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "params_m": cfg.num_params() / 1e6, "load_s": load_s, "rss_gb": rss2 / 1e9,
              "rss_before_load_gb": rss0 / 1e9, "rss_after_load_gb": rss1 / 1e9,
              "model_rss_gb": (rss2 - rss0) / 1e9,
              "peak_rss_gb": peak_rss_bytes() / 1e9, "packed_mb": sizes["packed_bytes"] / 1e6,
              "float_mb": sizes["float_bytes"] / 1e6, "zero_fraction": zf}
    for m in lat:
        tag = m["device"].split(":")[0]
        result.update({f"{tag}_runner": m["runner"], f"{tag}_threads": m["threads"],
                       f"{tag}_pp_tokens": m["prompt_tokens"], f"{tag}_pp_ms": m["prefill_ms"],
                       f"{tag}_pp_tok_s": m["prefill_tok_s"], f"{tag}_tg_ms_per_token": m["decode_ms_per_token"],
                       f"{tag}_tg_tok_s": m["decode_tok_s"]})
        if "gpu_mem_gb" in m:
            result.update(gpu_name=m["gpu_name"], gpu_mem_gb=m["gpu_mem_gb"], gpu_load_s=gpu_load_s)
    result.update({"energy_context_tokens": args.context, "energy_skip_zeros": args.skip_zeros,
                   "energy_bitnet_uj_per_token": energy["bitnet_pj"] / 1e6,
                   "energy_fp16_uj_per_token": energy["fp16_pj"] / 1e6, "energy_ratio": energy["ratio"],
                   "energy_matmul_bitnet_uj_per_token": energy["bitnet_matmul_pj"] / 1e6,
                   "energy_matmul_fp16_uj_per_token": energy["fp16_matmul_pj"] / 1e6,
                   "energy_matmul_ratio": energy["matmul_ratio"],
                   **{f"energy_{k}_pj": v for k, v in e.items()}})
    if args.charts:
        result["charts"] = ",".join(charts({"energy": energy, "latency": lat}, args.charts))
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0
