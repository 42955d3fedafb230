"""Shared fixtures of the training tests: a tiny BPE tokenizer, a synthetic corpus, its shards, a recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"

_WORDS = ("the cat dog bird sat ran flew over under near a big small red green house tree river "
          "and then quickly slowly saw heard found lost old new happy sad king queen road hill").split()


def synthetic_corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Short documents of simple sentences: learnable, deterministic, no outside data."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(8, 30)):
            n = rng.randint(4, 10)
            sents.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(synthetic_corpus()):
        (d / f"doc{i:03d}.txt").write_text(text + "\n")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    from bitnet158.train.tokenizer_train import train_bpe
    return train_bpe([corpus_dir], vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    from bitnet158.train.data import build_shards
    from bitnet158.train.text import iter_documents
    out = tmp_path_factory.mktemp("shards")
    build_shards(iter_documents([corpus_dir]), tokenizer_dir, out, val_fraction=0.1, progress=False)
    return out


def write_recipe(path: Path, shards: Path, steps: int = 12, eval_every: int = 6, ckpt_every: int = 3,
                 plot: bool = False, **extra: str) -> Path:
    """A tiny CPU recipe (fp32, 2 layers) over ``shards``; ``extra`` adds raw TOML lines per section."""
    sections = {
        "model": 'size = "tiny"\n',
        "model.overrides": "hidden_size = 32\nintermediate_size = 64\nnum_attention_heads = 2\n"
                           "num_key_value_heads = 1\nmax_position_embeddings = 64\n",
        "data": f'seq_len = 32\nval_rows = 8\nsources = {{ syn = "{shards}" }}\n'
                'stages = [{ syn = 1.0 }, { syn = 1.0 }]\n',
        "schedule": 'kind = "two_stage"\nwarmup_steps = 2\nlr_peak = 4e-3\nlr_peak2 = 1e-3\n',
        "train": f'steps = {steps}\nmicro_batch = 4\ndtype = "fp32"\nclip = 1.0\nplot = {str(plot).lower()}\n'
                 f'eval_every = {eval_every}\nckpt_every = {ckpt_every}\nkeep_checkpoints = 10\nquiet = true\n',
    }
    for k, v in extra.items():
        sections[k.replace("__", ".")] = sections.get(k.replace("__", "."), "") + v
    text = 'name = "test"\nseed = 0\n' + "".join(f"[{k}]\n{v}\n" for k, v in sections.items())
    path.write_text(text)
    return path


# ---------------------------------------------------------------- fine-tuning data and recipes

_FT_WORDS = "the cat dog bird sat ran flew over under near big small red green house tree river".split()


def chat_data(path, n, seed):
    """``n`` chat records in the three accepted layouts (Alpaca, ShareGPT, messages) as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(_FT_WORDS) for _ in range(rng.randint(2, 5)))
            a = " ".join(rng.choice(_FT_WORDS) for _ in range(rng.randint(3, 8))) + "."
            if i % 3 == 0:
                rec = {"instruction": q.capitalize() + "?", "input": "", "output": a.capitalize()}
            elif i % 3 == 1:
                rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                         {"from": "human", "value": "and then"}, {"from": "gpt", "value": "the end."}]}
            else:
                rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(rec) + "\n")


def pref_data(path, n, seed):
    """Chosen: a calm answer about a cat; rejected: a shouted answer about a dog (learnable, held out too)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(_FT_WORDS) for _ in range(rng.randint(2, 5)))
            calm = "the cat sat near the " + rng.choice(_FT_WORDS) + "."
            loud = "The dog ran over the " + rng.choice(_FT_WORDS) + "!"
            if i % 2:
                rec = {"chosen": f"\n\nHuman: {q}\n\nAssistant: {calm}",
                       "rejected": f"\n\nHuman: {q}\n\nAssistant: {loud}"}
            else:
                rec = {"prompt": q, "chosen": calm, "rejected": loud}
            f.write(json.dumps(rec) + "\n")


def ft_recipe(path, init, files, data_extra, steps, lr):
    """A tiny SFT / DPO recipe at ``path`` starting from ``init``; ``data_extra``: raw [data] TOML lines."""
    files_s = ", ".join(f'"{f}"' for f in files)
    path.write_text(f'name = "{path.stem}"\ninit = "{init}"\nexport = ["packed", "master"]\n'
                    f'[data]\nfiles = [{files_s}]\n{data_extra}'
                    f'[schedule]\nkind = "constant"\nlr_peak = {lr}\n'
                    f'[train]\nsteps = {steps}\nmicro_batch = 4\ndtype = "fp32"\nplot = false\nquiet = true\n'
                    f'eval_every = {steps}\n')
    return path


def pretrain_start(d: Path, shards: Path, steps: int) -> Path:
    """A tiny model pretrained for ``steps`` at ``d``/pre: the start of the fine-tuning tests."""
    from bitnet158.train.pretrain import run
    from bitnet158.train.recipe import Recipe
    pre = write_recipe(d / "pre.toml", shards, steps=steps, eval_every=steps, ckpt_every=steps)
    run(Recipe.from_file(pre), out=d / "pre", device="cpu")
    return d / "pre"


TOK_DIR = REPO / "tests" / "assets" / "tokenizer-tiny"          # a tiny BPE with the Llama-3 chat template


@pytest.fixture(scope="session")
def tok():
    from bitnet158.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(TOK_DIR)


@pytest.fixture(scope="session")
def enc(tok):
    """The chat encoder of ``tok`` (assistant-only label masks)."""
    from bitnet158.train.sft_data import ChatEncoder
    return ChatEncoder(tok)


def assert_transformers_logits(folder: Path, tokens, want, tol: float = 1e-4) -> None:
    """transformers' BitNetForCausalLM loads ``folder`` and gives the logits ``want`` on ``tokens`` [B, T]
    (skips without transformers or its BitNet model)."""
    import torch
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "BitNetForCausalLM"):
        pytest.skip("transformers without BitNetForCausalLM")
    hf = transformers.BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="eager").to(torch.float32).eval()
    with torch.no_grad():
        got = hf(tokens).logits.float()
    assert (want - got).abs().max().item() <= tol


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and reproducibly) on one thread; restore the setting afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
