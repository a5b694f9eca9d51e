"""lm-eval adapter: our runtime as an lm-eval ``LM``, registered as ``sublayer``.

    import tools.lm_eval_adapter  # registers "sublayer"
    lm_eval.simple_evaluate(model="sublayer", model_args="pretrained=smollm2-135m-instruct,plan=attn66", ...)

or from the command line (lm-eval 0.4.13 ignores entry points, so go through our wrapper):

    python -m tools.lm_eval --model sublayer --model_args pretrained=DIR,plan=attn66,batch_size=8 \
        --include_path ../shared/data/lm_eval_tasks --tasks arc_easy_local --limit 100

model_args: ``pretrained`` (checkpoint directory or ``smollm2-135m-instruct``; default: that model),
``plan`` (preset name, plan JSON path; default ``full``), ``dtype`` (auto/float32/bfloat16/float16),
``device`` (auto/cpu/cuda[:N]), ``batch_size`` (rows per forward), ``max_length`` (context length;
default the model's ``max_position_embeddings``, as lm-eval's HFLM), ``max_gen_toks`` (default 256),
``add_bos_token`` (as HFLM's), ``quant`` (none/int8/int4), ``group_size`` and ``quant_head`` (as
``runtime.load``'s: weights quantized at load time), ``threads`` (torch threads, 1 to the cores this
process may use; default torch's).

Everything is computed by ``runtime.Engine``; tokenisation mirrors lm-eval's ``HFLM`` exactly (the
same ``_encode_pair``, BOS handling, left truncation to ``max_length + 1`` tokens, rolling windows
and ``is_greedy``), so scores match ``--model hf`` on the same checkpoint and dtype.

Requests that share their context are scored together by ``runtime.scoring.Scorer``: the context
runs once into a KV cache and each continuation is scored on top of it (all of a multiple-choice
question's answers, or the whole few-shot preamble's work per question). A batch holds whole context
groups, longest first (lm-eval's ``Collator`` orders them). This module keeps only the lm-eval glue.
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from model.errors import UserError
from runtime.scoring import Scorer

log = logging.getLogger(__name__)

_DEFAULT_MAX_GEN_TOKS = 256
_DEFAULT_AUTO_BATCH = 16
def _parse_bool(name, value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"model_args {name}: expected true or false, got {value!r}")


def _parse_positive_int(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    if n is None or n < 1:
        raise UserError(f"model_args {name}: expected a positive integer, got {value!r}")
    return n


_MODEL_ARGS = ("pretrained", "plan", "dtype", "device", "batch_size", "max_length", "max_gen_toks",
               "add_bos_token", "compile", "quant", "group_size", "quant_head", "threads")


@register_model("sublayer")
class SublayerLM(TemplateLM):
    """lm-eval ``LM`` on ``runtime.Engine`` (loglikelihood, loglikelihood_rolling, generate_until)."""

    backend = "causal"

    def __init__(self, pretrained=None, plan=None, dtype="auto", device="auto", batch_size=1,
                 max_length=None, max_gen_toks=_DEFAULT_MAX_GEN_TOKS, add_bos_token=None, engine=None,
                 compile=True, quant=None, group_size=None, quant_head=False, threads=None, **kwargs):
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if k in ("max_batch_size",)}
        unknown = sorted(set(kwargs) - set(ignored))
        if unknown:
            raise UserError(f"sublayer model_args: unknown argument(s) {', '.join(unknown)}; "
                            f"expected some of {', '.join(_MODEL_ARGS)}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            warnings.warn(f"sublayer: batch_size={batch_size} is not supported; using {_DEFAULT_AUTO_BATCH}")
            batch_size = _DEFAULT_AUTO_BATCH
        self._batch_size = _parse_positive_int("batch_size", batch_size, allow_none=False)
        self._max_gen_toks = _parse_positive_int("max_gen_toks", max_gen_toks, allow_none=False)
        self.add_bos_token = _parse_bool("add_bos_token", add_bos_token)
        name = str(getattr(engine, "checkpoint_dir", None))
        if engine is None:
            import runtime
            from model.default_model import DEFAULT_MODEL

            name = DEFAULT_MODEL
            engine = runtime.load(None if pretrained in (None, "") else str(pretrained), plan=plan,
                                  dtype=str(dtype), device=str(device),
                                  compile=_parse_bool("compile", compile) is not False,
                                  quant=None if quant in (None, "") else str(quant),
                                  group_size=_parse_positive_int("group_size", group_size),
                                  quant_head=bool(_parse_bool("quant_head", quant_head)),
                                  threads=_parse_positive_int("threads", threads))
        self.engine = engine
        self.tokenizer = engine.tokenizer  # ours, not a transformers tokenizer
        self._device = engine.device
        limit = engine.config.max_position_embeddings
        self._max_length = _parse_positive_int("max_length", max_length)
        if self._max_length is not None and self._max_length > limit:
            raise UserError(f"model_args max_length: {self._max_length} is more than the model's "
                            f"max_position_embeddings ({limit})")
        # the model as the user named it (lm-eval records runs under it): no home directory in results
        self._name = str(pretrained) if pretrained not in (None, "") else name
        tok = self.tokenizer
        if tok.eos_ids:
            self._eot = tok.eos_ids[0]
        else:
            raise UserError(f"{self._name}: the tokenizer has no EOS token (lm-eval needs one)")
        self._prefix = tok.bos_id if tok.bos_id is not None else self._eot
        self._prefix_text = tok.token_text(self._prefix)
        self._bos_text = tok.token_text(tok.bos_id) if tok.bos_id is not None else None
        self._eot_text = tok.token_text(self._eot)
        print(f"sublayer: {engine.plan.describe()}", file=sys.stderr)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over lm-eval's own --batch_size/--device (whose defaults, 1 and cuda:0, are
        always passed). A --device naming CUDA on a machine without it falls back to the CPU, as HFLM does."""
        args = dict(arg_dict)
        for k, v in (additional_config or {}).items():
            if v is None or k in args:
                continue
            if k == "device" and str(v).startswith("cuda") and not torch.cuda.is_available():
                continue
            args[k] = v
        return cls(**args)

    # ---- what lm-eval asks of a model --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length or self.engine.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        e = self.engine
        return {"model_num_parameters": e.weight_bytes // e.elem_size, "model_dtype": str(e.dtype),
                "model_revision": "", "model_sha": "", "sublayer_plan": e.plan.describe()}

    # ---- tokenisation, as HFLM ---------------------------------------------------------------
    def _encode(self, string: str, add_special_tokens: bool | None) -> list[int]:
        """HF ``tokenizer.encode(string, add_special_tokens=...)``; None = the tokenizer's default."""
        tok = self.tokenizer
        if add_special_tokens is False:
            return tok.encode(string, add_special_tokens=False)
        if add_special_tokens is None or self.add_bos_token is None:
            return tok.encode(string, add_special_tokens=True)
        # add_bos_token=True given explicitly: the BOS is added whatever the checkpoint says
        ids = tok.encode(string, add_special_tokens=True)
        if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        return ids

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            add = self.add_bos_token  # HFLM's _add_special_kwargs: None leaves the tokenizer's default
            if has_bos_prefix(string, self._prefix_text):
                add = False
        else:
            add = add_special_tokens
        ids = self._encode(string, add)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        if not skip_special_tokens:
            return "".join(self.tokenizer.token_text(t) for t in tokens)
        return self.tokenizer.decode(tokens)

    # ---- scoring -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """requests: [(request strings or None, context ids, continuation ids)] -> [(logprob, is_greedy)].

        As HFLM: the scored sequence is (context + continuation)[-(max_length + 1):][:-1] and the
        continuation's log-probabilities are summed; is_greedy says every continuation token is the
        argmax. Rows that share everything before their scored part form a group."""
        n_max = self.max_length
        groups: dict[tuple, list[int]] = {}
        rows = []  # (prefix, scored inputs, targets)
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) == 0 or len(cont) == 0:
                raise ValueError("sublayer: a loglikelihood request has an empty context or continuation "
                                 "after tokenisation")
            if len(cont) > n_max:
                raise ValueError(f"sublayer: continuation of {len(cont)} tokens is longer than max_length {n_max}")
            full = (list(ctx) + list(cont))[-(n_max + 1):]
            if len(ctx) + len(cont) > n_max + 1:
                log.warning("context (%d) + continuation (%d) tokens exceed max_length %d: truncating %d "
                            "tokens from the left", len(ctx), len(cont), n_max, len(ctx) + len(cont) - n_max - 1)
            inp = full[:-1]
            p0 = len(inp) - len(cont)
            prefix = tuple(inp[:p0])
            rows.append((prefix, inp[p0:], list(cont)))
            groups.setdefault(prefix, []).append(i)

        def sort_key(item):  # longest first, as HFLM's _collate
            prefix, members = item
            longest = max(len(rows[i][1]) for i in members)
            return -(len(prefix) + longest), prefix

        collator = Collator(list(groups.items()), sort_fn=sort_key)
        scorer = Scorer(self.engine)  # remembers the last common prefix across batches
        res: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        batch: list = []
        n_rows = 0
        for (item,) in collator.get_batched(n=1):
            batch.append(item)
            n_rows += len(item[1])
            if n_rows >= self.batch_size:
                self._score_batch(scorer, batch, rows, requests, res, pbar)
                batch, n_rows = [], 0
        if batch:
            self._score_batch(scorer, batch, rows, requests, res, pbar)
        pbar.close()
        return res

    def _score_batch(self, scorer, batch, rows, requests, res, pbar):
        """batch: [(prefix, request indices)]: scores every request, fills ``res`` and lm-eval's cache."""
        scores = scorer.score_batch([(prefix, [rows[i][1:] for i in members]) for prefix, members in batch])
        for (_, members), group in zip(batch, scores):
            for i, answer in zip(members, group):
                res[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity over disjoint windows of max_length tokens, exactly as HFLM."""
        windows, counts = [], []
        for (string,) in tqdm([req.args for req in requests], disable=disable_tqdm or self.rank != 0,
                              desc="Windowing rolling requests"):
            ws = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows.extend((None,) + w for w in ws)
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[at:at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ---- generation --------------------------------------------------------------------------
    def _encode_contexts(self, contexts, max_ctx_len: int) -> list[list[int]]:
        """As HFLM.tok_batch_encode (left padding, left truncation), without the padding."""
        if has_bos_prefix(contexts[0], self._bos_text):
            add = False
        else:
            add = self.add_bos_token
        return [self._encode(c, add)[-max_ctx_len:] for c in contexts]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res = []

        def _collate(req):
            toks = self.tok_encode(req[0])
            return -len(toks), req[0]

        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests")
        re_ords = Collator([req.args for req in requests], sort_fn=_collate, group_by="gen_kwargs",
                           group_fn=lambda x: x[1])
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs = zip(*chunk)
            gen_kwargs = all_gen_kwargs[0]
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"sublayer: expected generation kwargs to be a dict, got {gen_kwargs!r}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eot_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"sublayer: max_gen_toks ({max_gen_toks}) must be less than max_length "
                                 f"({self.max_length})")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            temperature = temperature if do_sample else 0.0
            top_k = int(kwargs.pop("top_k", 0) or 0)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            seed = kwargs.pop("seed", None)
            if kwargs:
                log.warning("sublayer: ignoring generation kwargs %s", sorted(kwargs))
            ids = self._encode_contexts(list(contexts), max_ctx_len)
            gen = self.engine.generate(ids, max_new_tokens=max_gen_toks, temperature=temperature,
                                       top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                                       seed=seed, stop_sequences=[s for s in until if s])
            for new_ids, context in zip(gen.tokens, contexts):  # HFLM decodes the new ids alone
                s = postprocess_generated_text(generation=self.tok_decode(new_ids), stop=until, think_end_token=None)
                res.append(s)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
                pbar.update(1)
        res = re_ords.get_original(res)
        pbar.close()
        return res
