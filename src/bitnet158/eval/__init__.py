"""Evaluation: perplexity, zero-shot tasks from local files, the lm-eval adapter, efficiency report.

    from bitnet158.eval.perplexity import perplexity_text
    from bitnet158.eval.tasks import evaluate
    bitnet158 eval ppl MODEL --data wiki.test.raw     bitnet158 eval tasks MODEL --tasks piqa,copa
    bitnet158 bench MODEL                             # memory / latency / energy per token

``harness`` (lm-evaluation-harness ``LM``) is imported only on demand: lm-eval is an optional extra.
"""

from pathlib import Path


def default_data_dir() -> Path | None:
    """``../shared/data`` next to the repository or the working directory, if it exists."""
    import os
    env = os.environ.get("BITNET158_DATA")
    cands = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[3]
    cands += [repo / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data",
              Path.cwd() / "shared" / "data"]
    return next((p.resolve() for p in cands if p.is_dir()), None)
