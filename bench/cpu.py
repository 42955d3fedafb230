"""CPU engine benchmark: pp128 / tg128 tok/s and resident memory on a random model with exact 2B4T shapes.

    python3 bench/cpu.py                       # ours (bf16 + int8 head), torch reference, llama.cpp
    python3 bench/cpu.py --only ours-bf16      # one engine
    python3 bench/cpu.py --save                # also write bench/results/cpu-2026-11-25-<cpu>.json

Each engine runs in its own subprocess (so resident memory is its own), with the same thread count
(default 2), after a one-token warm-up (``--repeat N``: N interleaved runs, best of each kept): pp = prompt tokens / prefill seconds, tg = generated tokens
/ decode seconds (greedy, one token per step, the logits of every step computed). Engines:
  ours-bf16 / ours-int8   the C engine as ``bitnet158 generate`` runs it on a CPU: the torch-free
                          LiteRunner (bitnet158.kernels.cpu.lite) on a packed HF folder of the random
                          model written once under --gguf-dir (torch is never imported in that process),
                          default weight layout (B3, 1.6 bits, where AVX-512 VBMI decodes it);
                          ours-bf16-t16 / ours-int8-t16 (not run by default): the 2-bit T16 layout
  torchc-bf16 / -int8     (not run by default) the same C engine in a torch process (CpuRunner over
                          the torch model, dropped after conversion): what the Python API and the
                          server run; the same kernels, plus torch's ~0.23 GB resident
  torch                   the reference TorchRunner, pure torch (C kernels disabled), fewer tokens
  llamacpp-f16 / -q8_0    llama-cpp-python on a TQ2_0 GGUF of the same shapes from
                          bitnet158.convert.write_random_gguf (F16 / Q8_0 token_embd = tied head)
The streaming-read bandwidth (C loop with prefetch, same threads, 1 GB on huge pages; also on 4 KB
pages) gives the decode floor: weight bytes per token / bandwidth. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ours-bf16", "ours-int8", "torch", "llamacpp-f16", "llamacpp-q8_0")


def rss_gb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GB."""
    f = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(f["VmRSS"].split()[0]) / 1e6, int(f["VmHWM"].split()[0]) / 1e6


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _converters(runner):
    """(numpy -> runner input, runner output -> numpy): identity for the torch-free engine."""
    if getattr(runner, "arrays", None) == "numpy":
        return (lambda a: a), (lambda x: x)
    import torch
    return torch.from_numpy, (lambda x: x.numpy())


def _time_runner(runner, V: int, prompt: int, gen: int) -> dict:
    """pp / tg of a runner; numpy inputs for the torch-free engine, torch tensors otherwise. Greedy
    with numpy's argmax in every engine, as the llama.cpp loop below (torch's takes ~0.2 ms over
    128k logits)."""
    import numpy as np
    arr, to_np = _converters(runner)
    from_np = arr
    toks = np.random.default_rng(0).integers(0, V, (1, prompt))
    runner.prefill(arr(toks[:, :1]), arr(np.zeros((1, 1), dtype=np.int64)))         # warm-up
    t0 = time.perf_counter()
    logits = runner.prefill(arr(toks), arr(np.arange(prompt)[None]))
    t_pp = time.perf_counter() - t0
    nxt = from_np(to_np(logits).argmax(-1))
    t0 = time.perf_counter()
    for i in range(gen):
        lg = runner.decode(nxt, arr(np.array([prompt + i])))
        nxt = from_np(to_np(lg).argmax(-1))
    t_tg = time.perf_counter() - t0
    return {"pp_tok_s": prompt / t_pp, "tg_tok_s": gen / t_tg, "pp_tokens": prompt, "tg_tokens": gen}


def model_folder(work: Path) -> Path:
    """The random 2B4T-shaped model as a packed HF folder (written once, in a torch subprocess)."""
    folder = work / "2b4t-random-packed"
    if not (folder / "config.json").is_file():
        code = ("import sys; from bitnet158.random_model import random_packed_model; "
                "from bitnet158.checkpoint import save; save(random_packed_model('2b4t', seed=0), sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True, cwd=ROOT)
    return folder


def run_ours(head: str, layout: str | None, threads: int, prompt: int, gen: int, work: Path,
             lite: bool = True) -> dict:
    from bitnet158.kernels import cpu
    from bitnet158.kernels.cpu.cmodel import bandwidth, release_memory
    if lite:                                 # as `bitnet158 generate` on a CPU: torch never imported
        from bitnet158.kernels.cpu.lite import LiteRunner
        folder = model_folder(work)
        base_rss = rss_gb()[0]               # python + numpy + bitnet158 imported, no model yet
        t0 = time.perf_counter()
        runner = LiteRunner(folder, max_len=prompt + gen + 24, head=head, threads=threads, layout=layout)
    else:
        import torch
        torch.set_num_threads(threads)
        from bitnet158.kernels.cpu.runner import CpuRunner
        from bitnet158.random_model import random_packed_model
        base_rss = rss_gb()[0]               # python + torch + bitnet158 imported, no model yet
        t0 = time.perf_counter()
        model = random_packed_model("2b4t", seed=0)
        runner = CpuRunner(model, batch=1, max_len=prompt + gen + 24, head=head, threads=threads, layout=layout)
        del model
    release_memory()
    load_s = time.perf_counter() - t0
    r = _time_runner(runner, runner.vocab_size, prompt, gen)
    rss, hwm = rss_gb()
    r["baseline_rss_gb"] = base_rss
    r["torch_imported"] = "torch" in sys.modules
    stages = profile_decode(runner, prompt + gen, steps=16)
    bw = bandwidth(1 << 30, reps=5)                      # huge pages + prefetch: what the machine reaches
    bw4k = bandwidth(1 << 30, reps=3, huge=False)        # the same loop on default 4 KB pages
    return {**r, "rss_gb": rss, "peak_rss_gb": hwm, "load_s": load_s, "isa": cpu.isa(), "layout": runner.layout,
            "ternary_gb": runner.ternary_bytes / 1e9, "head_gb": runner.head_bytes / 1e9,
            "bandwidth_gb_s": bw, "bandwidth_4k_pages_gb_s": bw4k,
            "token_bytes_gb": (runner.head_bytes + runner.ternary_bytes) / 1e9, "decode_stage_ms": stages}


STAGES = ("norm+quant", "qkv", "rope+kv", "attention", "o_proj", "gate_up", "relu2+subnorm", "down", "head")


def profile_decode(runner, pos: int, steps: int) -> dict:
    """Wall-clock ms per decode token of each stage of the C forward (its own profiler)."""
    import ctypes

    import numpy as np
    arr = _converters(runner)[0]
    lib = runner._lib
    lib.bn_prof_enable(1)
    tok = arr(np.array([1]))
    for i in range(steps):
        runner.decode(tok, arr(np.array([pos + i])))
    out = (ctypes.c_double * 16)()
    n = lib.bn_prof_get(ctypes.addressof(out))
    lib.bn_prof_enable(0)
    return {STAGES[i]: round(out[i] * 1e3 / steps, 3) for i in range(n)}


def run_torch(threads: int, prompt: int, gen: int) -> dict:
    os.environ["BITNET158_CPU_KERNELS"] = "0"
    import torch
    torch.set_num_threads(threads)
    from bitnet158.engine.runner import TorchRunner
    from bitnet158.random_model import random_packed_model
    model = random_packed_model("2b4t", seed=0)
    runner = TorchRunner(model, batch=1, max_len=prompt + gen + 8)
    r = _time_runner(runner, model.config.vocab_size, prompt, gen)
    rss, hwm = rss_gb()
    return {**r, "rss_gb": rss, "peak_rss_gb": hwm}


def run_llamacpp(head: str, threads: int, prompt: int, gen: int, gguf_dir: Path) -> dict:
    import numpy as np
    from llama_cpp import Llama, __version__
    path = gguf_dir / f"2b4t-tq2_0-{head}.gguf"
    if not path.exists():
        from bitnet158.convert import write_random_gguf
        write_random_gguf(path, "2b4t", wtype="tq2_0", head=head)
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=prompt + gen + 16,
                n_batch=prompt, logits_all=False, verbose=False, use_mmap=False)
    rng = np.random.default_rng(0)
    toks = rng.integers(1000, 100000, size=prompt).tolist()
    llm.eval(toks[:1])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    t_pp = time.perf_counter() - t0
    V = llm.n_vocab()

    def last_logits():                       # the last token's logits (llama.cpp keeps only those)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,))

    nxt = int(np.argmax(last_logits()))
    t0 = time.perf_counter()
    for _ in range(gen):
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits()))
    t_tg = time.perf_counter() - t0
    rss, hwm = rss_gb()
    return {"pp_tok_s": prompt / t_pp, "tg_tok_s": gen / t_tg, "pp_tokens": prompt, "tg_tokens": gen,
            "rss_gb": rss, "peak_rss_gb": hwm, "llama_cpp_python": __version__}


def child(args) -> dict:
    e = args.only
    if e.startswith(("ours-", "torchc-")):           # ours|torchc-<head>[-<layout>]
        parts = e.split("-")
        return run_ours(parts[1], parts[2] if len(parts) > 2 else None, args.threads, args.prompt, args.gen,
                        Path(args.gguf_dir), lite=parts[0] == "ours")
    if e == "torch":
        return run_torch(args.threads, args.torch_prompt, args.torch_gen)
    if e.startswith("llamacpp-"):
        return run_llamacpp(e.split("-", 1)[1], args.threads, args.prompt, args.gen, Path(args.gguf_dir))
    raise SystemExit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--torch-prompt", type=int, default=32, help="prompt tokens for the slow torch reference")
    ap.add_argument("--torch-gen", type=int, default=8, help="generated tokens for the torch reference")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--only", help="run one engine in this process and print its JSON (used internally)")
    ap.add_argument("--gguf-dir", default=os.path.join(tempfile.gettempdir(), "bitnet158-bench"),
                    help="where the random model's GGUF files and HF folder are written (once)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every engine N times, interleaved, and keep each one's best (a shared machine)")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--suffix", default="", help="appended to the saved file's name (e.g. -v2)")
    args = ap.parse_args()
    if args.only:
        print(json.dumps(child(args)))
        return 0
    Path(args.gguf_dir).mkdir(parents=True, exist_ok=True)
    if any(e.startswith("ours-") for e in args.engines.split(",")):
        model_folder(Path(args.gguf_dir))       # written once, before any timed run
    load0 = os.getloadavg()[0]                 # other work on the machine skews every number
    res: dict[str, dict] = {}
    runs: dict[str, list] = {}
    engines = args.engines.split(",")
    for rep in range(args.repeat):              # interleaved: every engine sees the same conditions
        for e in engines:
            cmd = [sys.executable, __file__, "--only", e, "--threads", str(args.threads), "--prompt",
                   str(args.prompt), "--gen", str(args.gen), "--torch-prompt", str(args.torch_prompt),
                   "--torch-gen", str(args.torch_gen), "--gguf-dir", args.gguf_dir]
            # freed build-time buffers go back to the OS (glibc would keep part of its heap otherwise)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            load = os.getloadavg()[0]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode or not lines:
                r = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            else:
                r = {**json.loads(lines[-1]), "loadavg_before": load}
            runs.setdefault(e, []).append(r)
            print(f"  run {rep + 1} {e}: {r}", file=sys.stderr)
    for e, rs in runs.items():                  # best decode run of each engine (a shared machine)
        ok = [r for r in rs if "error" not in r]
        res[e] = max(ok, key=lambda r: r["tg_tok_s"]) if ok else rs[-1]
        if ok:
            res[e] = {**res[e], "pp_tok_s": max(r["pp_tok_s"] for r in ok), "runs": len(ok),
                      "tg_tok_s_all": [round(r["tg_tok_s"], 2) for r in ok],
                      "pp_tok_s_all": [round(r["pp_tok_s"], 1) for r in ok]}
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; random model with exact 2B4T shapes")
    print(f"{'engine':<16}{'pp tok/s':>10}{'tg tok/s':>10}{'RSS GB':>9}{'peak GB':>9}  note")
    for e, r in res.items():
        if "error" in r:
            print(f"{e:<16}{'-':>10}{'-':>10}{'-':>9}{'-':>9}  {r['error']}")
            continue
        note = f"pp{r['pp_tokens']}/tg{r['tg_tokens']}"
        if "bandwidth_gb_s" in r:
            floor = r["bandwidth_gb_s"] / r["token_bytes_gb"]
            note += (f", {r['isa']}/{r['layout']}, {r['token_bytes_gb']:.3f} GB/token, read BW "
                     f"{r['bandwidth_gb_s']:.1f} GB/s -> floor {floor:.1f} tok/s")
        if "baseline_rss_gb" in r:
            base = "python+torch" if r.get("torch_imported") else "python+numpy (no torch)"
            note += f", RSS {r['rss_gb'] - r['baseline_rss_gb']:.2f} GB over the {base} baseline"
        print(f"{e:<16}{r['pp_tok_s']:>10.1f}{r['tg_tok_s']:>10.2f}{r['rss_gb']:>9.2f}{r['peak_rss_gb']:>9.2f}  {note}")
    flat = {"cpu": cpu_name(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
            "command": "python3 bench/cpu.py " + " ".join(sys.argv[1:]),
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
    for e, r in res.items():
        key = e.replace("-", "_")
        if "pp_tok_s" in r:
            flat[f"{key}_pp{r['pp_tokens']}_tok_s"] = round(r["pp_tok_s"], 2)
            flat[f"{key}_tg{r['tg_tokens']}_tok_s"] = round(r["tg_tok_s"], 2)
            flat[f"{key}_rss_gb"] = round(r["rss_gb"], 3)
            flat[f"{key}_peak_rss_gb"] = round(r["peak_rss_gb"], 3)
            if "baseline_rss_gb" in r:
                flat[f"{key}_rss_over_baseline_gb"] = round(r["rss_gb"] - r["baseline_rss_gb"], 3)
                flat[f"{key}_torch_imported"] = r.get("torch_imported", True)
    ours = res.get("ours-bf16", {})
    if "bandwidth_gb_s" in ours:
        flat["read_bandwidth_gb_s"] = round(ours["bandwidth_gb_s"], 2)
        flat["read_bandwidth_4k_pages_gb_s"] = round(ours["bandwidth_4k_pages_gb_s"], 2)
        flat["ours_isa"] = ours["isa"]
        flat["ours_layout"] = ours["layout"]
        flat["ours_ternary_gb"] = round(ours["ternary_gb"], 4)
    for h, lh in (("bf16", "f16"), ("int8", "q8_0")):
        a, b = res.get(f"ours-{h}", {}), res.get(f"llamacpp-{lh}", {})
        if "tg_tok_s" in a and "tg_tok_s" in b:
            flat[f"tg_speedup_vs_llamacpp_{h}_head"] = round(a["tg_tok_s"] / b["tg_tok_s"], 3)
            flat[f"pp_speedup_vs_llamacpp_{h}_head"] = round(a["pp_tok_s"] / b["pp_tok_s"], 3)
    line = json.dumps(flat)
    if args.save:
        tag = "".join(c if c.isalnum() else "-" for c in cpu_name().lower()).strip("-")
        while "--" in tag:
            tag = tag.replace("--", "-")
        out = ROOT / "bench" / "results" / f"cpu-{time.strftime('%Y-%m-%d')}-{tag}{args.suffix}.json"
        out.write_text(json.dumps({**flat, "engines": res}, indent=1) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
