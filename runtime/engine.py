"""The engine: a compiled schedule's weights, a static KV cache, the forward pass and the decode step.

``load()`` is the one way every entry point (CLI, lm-eval adapter, tools, benchmarks) builds a model.
The forward pass is llama2.c-small: embedding, then per schedule step a fused residual-add + RMSNorm
and the sublayer (attention or SwiGLU MLP), then the final norm and LM head, all from the step
functions of ``runtime.step``. Each sublayer's output is added to the residual stream by the *next*
step's fused add+norm.

- ``forward`` / ``logits`` / ``score``: the plain eager path (prefill, scoring, observers);
- ``decode_step``: one new token per row, fast (``runtime.fast_decode``: compiled on CPU, a CUDA graph
  over the engine's own cache on GPU);
- ``generate``: see ``runtime.generation``.
"""

import copy
import ctypes
import sys
import weakref
from dataclasses import dataclass

import torch

import kernels
from kernels.dispatch import use_triton
from model.config import LlamaConfig, load_config
from model.errors import UserError
from model.quant import QuantScheme, QuantWeight, check_group_size, quantize, resolve_scheme
from model.tokenizer import Tokenizer
from model.weights import CheckpointReader
from runtime import fast_decode, generation, scoring
from runtime.kv_cache import KVCache, check_fits
from runtime.plan import Plan, load_plan
from runtime.schedule import AttentionStep, Schedule, compile_plan, full_schedule, needed_tensors
from runtime.step import embedding
from runtime.threads import use_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttentionWeights:  # projections: float tensors or QuantWeights of these shapes
    norm: torch.Tensor  # [H]
    qkv: torch.Tensor | QuantWeight  # [(Hq + 2 Hkv) D, H], q/k/v fused at load time
    o: torch.Tensor | QuantWeight    # [H, Hq D]


@dataclass
class MlpWeights:
    norm: torch.Tensor     # [H]
    gate_up: torch.Tensor | QuantWeight  # [2 I, H], gate/up fused at load time
    down: torch.Tensor | QuantWeight     # [H, I]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA cards that support it (float16 on older ones), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda[:N]; got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device: {device!r} asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device: {device!r} asked for but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
    return dev


def _check_max_seq_len(max_seq_len, config: LlamaConfig):
    if max_seq_len is None:
        return
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise UserError(f"--max-seq-len: expected a positive integer, got {max_seq_len!r}")
    if max_seq_len > config.max_position_embeddings:
        raise UserError(f"--max-seq-len: {max_seq_len} positions is beyond the model's context of "
                        f"{config.max_position_embeddings} (max_position_embeddings)")


def warn_if_degenerate(schedule: Schedule, out=None):
    """A plan that keeps no attention sublayer (no token sees another), or nothing at all, runs, but
    says what remains."""
    out = out or sys.stderr  # resolved per call: sys.stderr may be replaced after import
    plan = schedule.plan
    if not schedule.steps:
        print(f"warning: plan {plan.name!r} keeps no sublayer at all: what remains is the embedding, the "
              f"final norm and the LM head (every token's logits depend on that token only)", file=out)
    elif schedule.num_kv_slots == 0:
        print(f"warning: plan {plan.name!r} keeps no attention sublayer: what remains is "
              f"{len(schedule.steps)} MLP sublayer(s) (layers {', '.join(map(str, plan.kept_mlp))}); no token "
              f"sees another", file=out)


def release_freed_memory():
    """Hand freed heap pages back to the OS: glibc keeps the float temporaries of load-time quantization
    otherwise (SmolLM2 int8: 962 MiB resident after load, 538 after this)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load(model=None, plan=None, dtype="auto", device="auto", max_seq_len=None, show_progress=True,
         compile=True, quant=None, group_size=None, quant_head=False, threads=None) -> "Engine":
    """Build an Engine for checkpoint directory or known model name ``model`` (None: the default model).

    plan: None (full), a preset name, a plan JSON path, a plan dict or a resolved Plan.
    max_seq_len: size of the static KV cache; None sizes it per call (prompt + new tokens).
    compile: run ``decode_step`` fast: the step compiled with inductor on CPU, a CUDA graph on GPU
    (``runtime.fast_decode``). False keeps it eager (torch references on CPU, plain Triton launches on GPU).
    quant: None, "int8" (symmetric, one scale per output channel, or per ``group_size`` inputs) or "int4"
    (``group_size`` inputs per scale and offset, default 64): every kept projection is quantized at load
    time (``model.quant``), one tensor at a time, after the plan removed what it drops; the embedding
    and LM head stay in the compute dtype unless ``quant_head`` (tied: one quantized table, the
    embedding lookup dequantizes the rows it reads). A checkpoint that stores quantized weights (GGUF
    blocks kept) runs them as they are, and ``quant`` is an error for it.
    threads: torch threads for this process (default: torch's setting, at most the cores it may use,
    ``os.sched_getaffinity``; ``runtime.threads``).
    """
    from model.default_model import resolve_model

    use_threads(threads)
    scheme = resolve_scheme(quant, group_size, quant_head)  # bad flags fail before anything is read
    checkpoint = resolve_model(model, show_progress=show_progress)
    config = load_config(checkpoint)
    carried = config.carried_plan  # Nemotron-NAS no-ops / LLM-Drop lists, or None
    if carried is not None:
        if plan is not None:
            raise UserError(f"{checkpoint}: the checkpoint already carries a plan ({carried['name']!r}: its "
                            f"config drops sublayers); do not pass a plan (--plan) for it")
        plan = carried
    schedule = compile_plan(load_plan(plan, config.num_layers), config)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_max_seq_len(max_seq_len, config)
    warn_if_degenerate(schedule)
    return Engine(checkpoint, schedule, dt, dev, max_seq_len, compile, quant=scheme)


def load_shape(shape: str, plan=None, dtype="auto", device="auto", max_seq_len=None, compile=True,
               seed: int = 0, quant=None, group_size=None, quant_head=False, threads=None) -> "Engine":
    """An Engine of a named shape (``model.shapes.SHAPES``) with random weights, for latency only
    (no tokenizer: it decodes token ids, it cannot generate text)."""
    from model.shapes import SHAPES, RandomWeights, shape_config

    use_threads(threads)
    scheme = resolve_scheme(quant, group_size, quant_head)
    if shape not in SHAPES:
        raise UserError(f"--shape: expected one of {', '.join(SHAPES)}; got {shape!r}")
    config = shape_config(shape)
    dev = resolve_device(device)
    _check_max_seq_len(max_seq_len, config)
    schedule = compile_plan(load_plan(plan, config.num_layers), config)
    warn_if_degenerate(schedule)
    return Engine(None, schedule, resolve_dtype(dtype, dev), dev, max_seq_len, compile, reader=RandomWeights(seed),
                  quant=scheme)


class Engine:
    def __init__(self, checkpoint_dir, schedule: Schedule, dtype: torch.dtype, device: torch.device,
                 max_seq_len: int | None = None, compile: bool = True, reader=None, quant: QuantScheme | None = None):
        self.checkpoint_dir, self.schedule, self.config = checkpoint_dir, schedule, schedule.config
        self.quant = quant  # QuantScheme or None (all float); a checkpoint's stored blocks are added at load
        self.dtype, self.device, self.max_seq_len = dtype, device, max_seq_len
        # decode_step: "compiled" (CPU inductor), "graph" (CUDA graph over the engine's own cache) or
        # "eager". The Triton-on-CPU test path (SUBLAYER_TRITON=1) must reach the kernels: eager.
        if not compile or (device.type == "cpu" and use_triton(torch.empty(0))):
            self.decode_mode = "eager"
        else:
            self.decode_mode = "graph" if device.type == "cuda" else "compiled"
        self.graph_backend = torch.cuda
        self._graph: fast_decode.DecodeGraph | None = None
        self._cache: KVCache | None = None
        # reader: a CheckpointReader, or model.shapes.RandomWeights (no checkpoint, no tokenizer)
        config = self.config
        self.tokenizer = Tokenizer(checkpoint_dir, config.bos_token_id, config.eos_token_ids) if checkpoint_dir else None
        self._load_weights(reader or CheckpointReader(checkpoint_dir))
        self.cos, self.sin = kernels.rope_tables(
            kernels.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
            config.max_position_embeddings, device)
        self.scale = config.head_dim ** -0.5

    # ---- weights -------------------------------------------------------------------------
    def _load_weights(self, rd):
        shapes = needed_tensors(self.schedule.steps, self.config)
        q = self._resolve_stored(rd)

        def read_cat(*names):
            """Tensors ``names`` fused along rows: stored quantized -> as they are; quantized by the
            scheme -> read in float32 and quantized, one fused tensor at a time; else the compute dtype."""
            parts = [(n, shapes[n]) for n in names]
            if q is not None and names[0] in q.stored:
                return rd.read_quant_cat(parts, self.device)
            if q is not None and q.layout(names[0], shapes[names[0]]) is not None:
                w = quantize(rd.read_cat(parts, torch.float32, "cpu"), q.kind, q.group_size, what=names[0])
                return QuantWeight(*(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in w))
            return rd.read_cat(parts, self.dtype, self.device)

        read = read_cat
        if q is not None and q.kind is not None:  # every group size checked before anything is read
            for name, shape in shapes.items():
                layout = q.layout(name, shape)
                if layout is not None:
                    check_group_size(q.kind, layout[1], shape[1], f"{name} (shape {list(shape)})")

        self.embed = read("model.embed_tokens.weight")
        self.final_norm = read("model.norm.weight")
        self.lm_head = self.embed if self.config.tie_word_embeddings else read("lm_head.weight")
        self.layers = []
        for step in self.schedule.steps:
            p = f"model.layers.{step.layer}."
            if isinstance(step, AttentionStep):
                qkv = read_cat(*(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
                self.layers.append(AttentionWeights(read(p + "input_layernorm.weight"), qkv,
                                                    read(p + "self_attn.o_proj.weight")))
            else:
                gate_up = read_cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                self.layers.append(MlpWeights(read(p + "post_attention_layernorm.weight"), gate_up,
                                              read(p + "mlp.down_proj.weight")))
        self.names_read = rd.names_read
        rd.close()  # drop the memory maps: everything needed is copied into owned tensors
        if q is not None and q.kind is not None:
            release_freed_memory()

    def _resolve_stored(self, rd) -> QuantScheme | None:
        """The engine's scheme with the weights ``rd``'s checkpoint stores quantized (GGUF blocks kept;
        every weight of the full model is looked up, for the byte counts). UserError if load-time
        quantization is asked for such a checkpoint."""
        quant_type = getattr(rd, "quant_type", None)  # model.shapes.RandomWeights stores nothing quantized
        if quant_type is None:
            return self.quant
        names = needed_tensors(full_schedule(self.config).steps, self.config)
        types = {n: t for n in names if (t := quant_type(n)) is not None}
        if not types:
            return self.quant
        from model.weights import QUANT_TYPES

        if self.quant is not None:
            listed = ", ".join(sorted(set(types.values())))
            raise UserError(f"--quant: {self.checkpoint_dir} is already quantized ({len(types)} weights stored as "
                            f"{listed} blocks); --quant and --quant-head apply to float checkpoints only")
        self.quant = QuantScheme(stored={n: (*QUANT_TYPES[t], t) for n, t in types.items()})
        return self.quant

    def with_plan(self, plan) -> "Engine":
        """An Engine for ``plan`` sharing this engine's weight tensors (nothing copied or re-read), so
        that a plan search can score many candidates against one loaded model. ``plan`` (anything
        ``load`` takes) must drop at least what this engine's plan drops: dropped weights were never
        loaded."""
        schedule = compile_plan(load_plan(plan, self.config.num_layers), self.config)
        weights = {(type(s), s.layer): w for s, w in zip(self.schedule.steps, self.layers)}
        missing = [f"layer {s.layer} {'attention' if isinstance(s, AttentionStep) else 'MLP'}"
                   for s in schedule.steps if (type(s), s.layer) not in weights]
        if missing:
            raise UserError(f"plan {schedule.plan.name!r} keeps sublayers this engine's plan dropped "
                            f"({', '.join(missing)}); load the model with that plan instead")
        sub = copy.copy(self)
        sub.schedule = schedule
        sub.layers = [weights[(type(s), s.layer)] for s in schedule.steps]
        sub._cache = sub._graph = None
        return sub

    # ---- accounting (the schedule counts; the engine knows its dtype) ----------------------
    @property
    def plan(self) -> Plan:
        return self.schedule.plan

    @property
    def elem_size(self) -> int:
        return self.dtype.itemsize

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this plan loads (at the engine's dtype; quantized weights as stored)."""
        return self.schedule.weight_bytes(self.elem_size, self.quant)

    @property
    def full_weight_bytes(self) -> int:
        """Bytes the same model would load with nothing dropped (same quantization)."""
        return full_schedule(self.config).weight_bytes(self.elem_size, self.quant)

    def kv_bytes(self, seq_len: int | None = None, batch: int = 1, full: bool = False) -> int:
        """KV-cache bytes for ``batch`` rows of ``seq_len`` positions (default: max_seq_len)."""
        seq_len = seq_len or self.max_seq_len or self.config.max_position_embeddings
        schedule = full_schedule(self.config) if full else self.schedule
        return schedule.kv_bytes(self.elem_size, seq_len, batch)

    def step_bytes(self, context: int, batch: int = 1) -> int:
        """Bytes one decode step reads with ``context`` cached positions per row (``Schedule.step_bytes``)."""
        return self.schedule.step_bytes(self.elem_size, context, batch, self.quant)

    # ---- the KV cache --------------------------------------------------------------------------
    def new_cache(self, batch: int, seq_len: int) -> KVCache:
        """A fresh zeroed cache; refused (UserError with the bytes) if memory cannot hold it."""
        c = self.config
        check_fits(self.kv_bytes(seq_len, batch), self.device, f"a KV cache of {batch} x {seq_len} positions")
        return KVCache(self.schedule.num_kv_slots, batch, c.num_kv_heads, seq_len, c.head_dim, self.dtype, self.device)

    def own_cache(self, batch: int, seq_len: int) -> KVCache:
        """The engine's own cache (``max_seq_len`` positions if set), reused while the batch and length
        stay the same. On a GPU, ``decode_step`` over this cache replays one captured CUDA graph."""
        if self.max_seq_len is not None:
            seq_len = self.max_seq_len
        c = self._cache
        if c is None or c.batch != batch or c.max_seq_len != seq_len:
            self._cache = self._graph = None  # free the old cache (and a graph over it) before allocating
            self._cache = c = self.new_cache(batch, seq_len)
        return c

    # ---- forward and decode --------------------------------------------------------------------
    def _run(self, tokens, cache: KVCache, positions, index, kv_start, steps, prefill_start=None, length=None,
             observer=None, last_only=False):
        """The layers over ``steps`` (a ``fast_decode.Steps``): embedding, every schedule step, the head.
        length: cut each cache slot to this many positions (the batch's longest used length)."""
        c = self.config
        eps = c.rms_norm_eps
        x = embedding(tokens, self.embed, self.dtype)
        pending = None if prefill_start is not None else torch.zeros_like(x)  # x + 0: one compiled form
        for step, w in zip(self.schedule.steps, self.layers):
            if isinstance(step, AttentionStep):
                kc, vc = cache.k[step.slot], cache.v[step.slot]
                if length is not None:
                    kc, vc = kc[:, :, :length], vc[:, :, :length]  # a dynamic dimension of the compiled step
                x, pending = steps.attention(pending, x, w.norm, w.qkv, w.o, kc, vc, self.cos, self.sin, positions,
                                             index, kv_start, c.num_heads, c.num_kv_heads, eps, self.scale,
                                             prefill_start=prefill_start)
            else:
                x, pending = steps.mlp(pending, x, w.norm, w.gate_up, w.down, eps)
            if observer is not None:
                observer(step, x, x + pending)
        if last_only:
            x, pending = x[:, -1:], None if pending is None else pending[:, -1:]
        return steps.head(pending, x, self.final_norm, self.lm_head, eps)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, cache_start: int, kv_start: torch.Tensor,
                positions: torch.Tensor, last_only: bool = False, observer=None) -> torch.Tensor:
        """The eager path (prefill and scoring; never the fast decode path, whatever T is).

        tokens: [B, T] at cache indices cache_start..cache_start+T-1 (an int, the same in every row);
        kv_start: [B] int32 first valid cache index per row (left padding); positions: [B, T] rotary
        positions. Returns logits [B, T or 1, V] in the engine's dtype.

        ``observer(step, x_in, x_out)``, if given, sees the residual stream [B, T, H] entering and
        leaving every schedule step (x_out = x_in + sublayer(norm(x_in))): the importance tools use it."""
        B, T = tokens.shape
        if cache_start < 0 or cache_start + T > cache.max_seq_len:
            raise UserError(f"forward: cache indices {cache_start}..{cache_start + T - 1} outside the cache's "
                            f"{cache.max_seq_len} positions")
        index = torch.full((B,), cache_start, dtype=torch.long, device=tokens.device)
        return self._run(tokens, cache, positions, index, kv_start, fast_decode.EAGER, prefill_start=cache_start,
                         observer=observer, last_only=last_only)

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache, index: torch.Tensor,
                    kv_start: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row: tokens [B, 1] int64; index [B] int64, the cache index each row's token
        is written at (rows may stand at different positions); kv_start [B] int32, each row's first
        valid cache index (default 0); its rotary position is index - kv_start. Returns logits [B, 1, V].

        Runs the step functions of ``runtime.step``: compiled on CPU; on a GPU replayed as a CUDA graph
        when ``cache`` is the engine's own (``own_cache``), captured once per such cache, and launched
        plainly over any other cache (no capture per new cache)."""
        B = tokens.shape[0]
        if kv_start is None:
            kv_start = torch.zeros(B, dtype=torch.int32, device=tokens.device)
        if self.decode_mode == "graph" and cache is self._cache:
            g = self._graph
            if g is None or g.batch != B:
                self._graph = None  # release the old graph's memory pool first
                self._graph = g = fast_decode.DecodeGraph(weakref.WeakMethod(self._graph_step), cache, B,
                                                          self.device, self.graph_backend)
            return g(tokens, index, kv_start)
        steps = fast_decode.compiled_steps() if self.decode_mode == "compiled" else fast_decode.EAGER
        length = None
        if self.device.type == "cpu":  # reading the index costs nothing here: cut the cache to what is used
            length = int(index.max()) + 1
            if length > cache.max_seq_len or int(index.min()) < 0:
                raise UserError(f"decode_step: cache index {int(index.max()) if length > 1 else int(index.min())} "
                                f"outside the cache's {cache.max_seq_len} positions")
        return self._run(tokens, cache, (index - kv_start)[:, None], index, kv_start, steps, length=length)

    def _graph_step(self, tokens, cache, index, kv_start):
        """The step a CUDA graph captures: the eager step functions over the whole static cache."""
        return self._run(tokens, cache, (index - kv_start)[:, None], index, kv_start, fast_decode.EAGER)

    def check_length(self, n: int, what: str):
        """UserError if ``n`` positions do not fit the context (``max_seq_len`` or the model's)."""
        limit = self.config.max_position_embeddings
        if self.max_seq_len is not None:
            limit = min(limit, self.max_seq_len)
        if n > limit:
            raise UserError(f"{what} needs {n} positions, but the context holds {limit} "
                            f"({'--max-seq-len' if self.max_seq_len and self.max_seq_len < self.config.max_position_embeddings else 'max_position_embeddings of the model'})")

    def check_token_ids(self, rows, what: str = "token ids"):
        """UserError unless ``rows`` (lists of ids) hold only integers in 0..vocab_size-1."""
        V = self.config.vocab_size
        for r, row in enumerate(rows):
            for i, t in enumerate(row):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                    raise UserError(f"{what}: expected integers in 0..{V - 1} (the vocabulary), got {t!r} "
                                    f"(row {r}, position {i})")

    @torch.inference_mode()
    def logits(self, token_ids, observer=None, last_only: bool = False) -> torch.Tensor:
        """Scoring: token_ids [T] or [B, T] (list or tensor, equal lengths) -> float32 logits [B, T, V]
        ([B, 1, V] with ``last_only``). ``observer``: see ``forward``. Always the eager path."""
        if not isinstance(token_ids, torch.Tensor):
            rows = list(token_ids)
            self.check_token_ids(rows if rows and isinstance(rows[0], (list, tuple)) else [rows], "logits token ids")
        ids = torch.as_tensor(token_ids, device=self.device)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise UserError(f"logits token ids: expected integers, got a tensor of {ids.dtype}")
        ids = ids.long()
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if T == 0:
            raise UserError("logits: empty token sequence")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise UserError(f"logits token ids: expected integers in 0..{self.config.vocab_size - 1} (the vocabulary), got "
                            f"{int(ids.min())}..{int(ids.max())}")
        self.check_length(T, f"a sequence of {T} tokens")
        cache = self.new_cache(B, T) if self.max_seq_len is None else self.own_cache(B, T)
        kv_start = torch.zeros(B, dtype=torch.int32, device=self.device)
        positions = torch.arange(T, device=self.device)[None].expand(B, T)
        return self.forward(ids, cache, 0, kv_start, positions, last_only=last_only, observer=observer).float()

    def score(self, prefix_ids, continuations) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, is greedy) of each continuation (token ids) after ``prefix_ids``,
        the prefix run once (``runtime.scoring``; for batches of prefix groups, ``scoring.Scorer``)."""
        return scoring.score(self, prefix_ids, continuations)

    def encode_prompts(self, prompts, chat: bool = False) -> list[list[int]]:
        if self.tokenizer is None:
            raise UserError("this engine has no tokenizer (a random-weight --shape engine): pass token ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer.encode_chat if chat else self.tokenizer.encode
        return [enc(p) for p in prompts]

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop_at_eos: bool = True,
                 stop_sequences: list[str] | None = None, on_token=None) -> generation.Generation:
        """Generate from text prompt(s) or token ids: see ``runtime.generation.generate``."""
        return generation.generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, chat,
                                   stop_at_eos, stop_sequences, on_token)
