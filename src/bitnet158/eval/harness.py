"""lm-evaluation-harness adapter: a ``bitnet158`` model type for ``lm_eval`` (optional extra ``eval``).

    pip install 'bitnet158[eval]'
    import bitnet158.eval.harness                      # registers the model type "bitnet158"
    import lm_eval
    out = lm_eval.simple_evaluate(model="bitnet158", model_args="pretrained=path/to/model,batch_size=16",
                                  tasks=["piqa"])

    lm = BitNetLM(model=model, tokenizer=tokenizer)    # or wrap a model already in memory

``loglikelihood`` and ``loglikelihood_rolling`` run the same code as ``bitnet158 eval``
(:func:`bitnet158.eval.tasks.loglikelihood_ids`, :func:`bitnet158.eval.perplexity.perplexity` with
lm-eval's disjoint rolling windows), so both give the same numbers on the same requests.
``generate_until`` runs the generation engine (greedy unless ``do_sample``) and cuts the text at the
first ``until`` string. This module imports lm-eval at import time; nothing else in bitnet158 does.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..engine import SamplingParams, generate
from ..errors import BitNetError
from .perplexity import perplexity
from .tasks import encode_pair, loglikelihood_ids


@register_model("bitnet158")
class BitNetLM(LM):
    """An lm-eval ``LM`` over a bitnet158 model (loaded from ``pretrained`` or passed in)."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 16,
                 max_length: int | None = None, device: str = "cpu", dtype: str | None = None,
                 max_gen_toks: int = 256, add_bos: bool = True, **kwargs):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise BitNetError("BitNetLM: give pretrained=<model folder> or model=/tokenizer=")
            from ..checkpoint import load, resolve
            from ..tokenizer import Tokenizer
            folder = resolve(pretrained)
            model = load(folder, dtype=dtype, device=device)
            tokenizer = tokenizer or Tokenizer.from_pretrained(folder)
        if tokenizer is None:
            raise BitNetError("BitNetLM: a tokenizer is needed with model=")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = add_bos

    # lm-eval reads these
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tokenizer, context, continuation, add_bos=self.add_bos)
            if not ctx:                      # empty context and no BOS: condition on the prefix token
                ctx = [self.prefix_token_id]
            pairs.append((ctx, cont))
        out = loglikelihood_ids(self.model, pairs, self.batch_size, self._max_length)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = [self.prefix_token_id] + self.tokenizer.encode(req.args[0])
            if len(ids) < 2:
                out.append(0.0)
                continue
            r = perplexity(self.model, ids, ctx=self._max_length, stride=self._max_length,
                           batch_size=self.batch_size)
            out.append(-r.nll)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, -r.nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if kw.pop("do_sample", False) else 0.0
            ids = self.tokenizer.encode(context, add_bos=self.add_bos)
            ids = ids[-max(1, self._max_length - max_gen):]           # keep the most recent context
            params = SamplingParams(temperature=temperature, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                                    seed=kw.pop("seed", 1234) if temperature > 0 else None,
                                    max_new_tokens=max(1, min(max_gen, self._max_length - len(ids))),
                                    stop_ids=frozenset(self.tokenizer.stop_ids))
            dec = self.tokenizer.stream_decoder()
            text = ""
            gen = generate(self.model, ids, params)
            for tok in gen:
                text += dec.push(tok)
                if any(u and u in text for u in until):
                    break
            gen.close()
            text += dec.flush()
            cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
            text = text[:cut]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


__all__ = ["BitNetLM"]
