"""The engine: a compiled schedule's weights, a static KV cache, prefill + decode, sampling.

``load()`` is the one way every entry point (CLI, lm-eval adapter, tools, benchmarks) builds a model.
The forward pass is llama2.c-small: embedding, then per schedule step a fused residual-add + RMSNorm
and the sublayer (attention or SwiGLU MLP), then the final norm and LM head. Each sublayer's output
is added to the residual stream by the *next* step's fused add+norm.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
from kernels.dispatch import use_triton
from model.config import LlamaConfig, load_config
from model.errors import UserError
from model.tokenizer import Tokenizer
from model.weights import CheckpointReader
from runtime import cpu_decode
from runtime.compile import AttentionStep, Schedule, compile_plan, needed_tensors
from runtime.kv_cache import KVCache, kv_bytes
from runtime.plan import Plan, load_plan
from runtime.sampling import sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttentionWeights:
    norm: torch.Tensor  # [H]
    qkv: torch.Tensor   # [(Hq + 2 Hkv) D, H], q/k/v fused at load time
    o: torch.Tensor     # [H, Hq D]


@dataclass
class MlpWeights:
    norm: torch.Tensor     # [H]
    gate_up: torch.Tensor  # [2 I, H], gate/up fused at load time
    down: torch.Tensor     # [H, I]


@dataclass
class Generation:
    """Result of ``Engine.generate``: new token ids and text per prompt, and timings."""

    tokens: list[list[int]]
    texts: list[str]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    finished: list[bool] = field(default_factory=list)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu or cuda[:N]; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {device!r} asked for but CUDA is not available")
    return dev


def load(model=None, plan=None, dtype="auto", device="auto", max_seq_len=None, show_progress=True,
         compile=True) -> "Engine":
    """Build an Engine for checkpoint directory or known model name ``model`` (None: the default model).

    plan: None (full), a preset name, a plan JSON path, a plan dict or a resolved Plan.
    max_seq_len: size of the static KV cache; None sizes it per call (prompt + new tokens).
    compile: run decode steps (one token per row) fast: through the inductor-compiled step on CPU
    (``runtime/cpu_decode.py``), as a replayed CUDA graph on GPU (``DecodeGraph``). False keeps every
    step eager (the torch reference on CPU, plain Triton launches on GPU).
    """
    from model.default_model import resolve_model

    checkpoint = resolve_model(model, show_progress=show_progress)
    config = load_config(checkpoint)
    carried = config.carried_plan  # Nemotron-NAS no-ops / LLM-Drop lists, or None
    if carried is not None:
        if plan is not None:
            raise UserError(f"{checkpoint}: the checkpoint already carries a plan ({carried['name']!r}: its "
                            f"config drops sublayers); do not pass a plan (--plan) for it")
        plan = carried
    resolved = load_plan(plan, config.num_layers)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise UserError(f"--max-seq-len: expected a positive integer, got {max_seq_len!r}")
    return Engine(checkpoint, config, compile_plan(resolved, config), dt, dev, max_seq_len, compile)


def load_shape(shape: str, plan=None, dtype="auto", device="auto", max_seq_len=None, compile=True,
               seed: int = 0) -> "Engine":
    """An Engine of a named shape (``model.shapes.SHAPES``) with random weights, for latency only."""
    from model.shapes import SHAPES, RandomWeights, shape_config

    if shape not in SHAPES:
        raise UserError(f"--shape: expected one of {', '.join(SHAPES)}; got {shape!r}")
    config = shape_config(shape)
    dev = resolve_device(device)
    return Engine(None, config, compile_plan(load_plan(plan, config.num_layers), config), resolve_dtype(dtype, dev),
                  dev, max_seq_len, compile, reader=RandomWeights(seed))


class Engine:
    def __init__(self, checkpoint_dir, config: LlamaConfig, schedule: Schedule, dtype: torch.dtype,
                 device: torch.device, max_seq_len: int | None = None, compile: bool = True, reader=None):
        self.checkpoint_dir, self.config, self.schedule = checkpoint_dir, config, schedule
        self.dtype, self.device, self.max_seq_len = dtype, device, max_seq_len
        # Decode steps (T = 1): inductor-compiled on CPU, replayed as a CUDA graph on GPU. The
        # Triton-on-CPU test path (SUBLAYER_TRITON=1) must reach the kernels, so it stays eager.
        self.compiled_decode = compile and device.type == "cpu" and not use_triton(torch.empty(0))
        self.graph_decode = compile and device.type == "cuda"
        self._graph: DecodeGraph | None = None
        # reader: a CheckpointReader, or model.shapes.RandomWeights (no checkpoint, no tokenizer)
        self.tokenizer = Tokenizer(checkpoint_dir, config.bos_token_id, config.eos_token_ids) if checkpoint_dir else None
        self.reader = reader or CheckpointReader(checkpoint_dir)
        self._load_weights()
        cos, sin = kernels.rope_tables(kernels.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
                                       config.max_position_embeddings, device)
        self.cos, self.sin = cos, sin
        self.scale = config.head_dim ** -0.5
        self._cache: KVCache | None = None

    # ---- weights -------------------------------------------------------------------------
    def _load_weights(self):
        c, rd = self.config, self.reader
        shapes = needed_tensors(self.schedule.steps, c)

        def read(name):
            return rd.read(name, shapes[name], self.dtype, self.device)

        self.embed = read("model.embed_tokens.weight")
        self.final_norm = read("model.norm.weight")
        self.lm_head = self.embed if c.tie_word_embeddings else read("lm_head.weight")
        self.layers = []
        for step in self.schedule.steps:
            p = f"model.layers.{step.layer}."
            if isinstance(step, AttentionStep):
                qkv = rd.read_cat([(n, shapes[n]) for n in (p + f"self_attn.{x}_proj.weight" for x in "qkv")],
                                  self.dtype, self.device)
                self.layers.append(AttentionWeights(read(p + "input_layernorm.weight"), qkv,
                                                    read(p + "self_attn.o_proj.weight")))
            else:
                gate_up = rd.read_cat([(n, shapes[n]) for n in (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")],
                                      self.dtype, self.device)
                self.layers.append(MlpWeights(read(p + "post_attention_layernorm.weight"), gate_up,
                                              read(p + "mlp.down_proj.weight")))
        self.names_read = rd.names_read
        rd.close()  # drop the memory maps: everything needed is copied into owned tensors
        self.reader = None

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

    @property
    def plan(self) -> Plan:
        return self.schedule.plan

    @property
    def elem_size(self) -> int:
        return self.dtype.itemsize

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this plan loads (at the engine's dtype)."""
        return self._param_count(self.schedule.steps) * self.elem_size

    @property
    def full_weight_bytes(self) -> int:
        """Bytes the same model would load with nothing dropped."""
        full = compile_plan(load_plan(None, self.config.num_layers), self.config)
        return self._param_count(full.steps) * self.elem_size

    def _param_count(self, steps) -> int:
        return sum(torch.Size(shape).numel() for shape in needed_tensors(steps, self.config).values())

    def kv_bytes(self, seq_len: int | None = None, batch: int = 1, full: bool = False) -> int:
        """KV-cache bytes for ``batch`` rows of ``seq_len`` positions (default: max_seq_len)."""
        seq_len = seq_len or self.max_seq_len or self.config.max_position_embeddings
        slots = self.config.num_layers if full else self.schedule.num_kv_slots
        return kv_bytes(slots, batch, seq_len, self.config.num_kv_heads, self.config.head_dim, self.elem_size)

    # ---- forward -------------------------------------------------------------------------
    def new_cache(self, batch: int, seq_len: int) -> KVCache:
        return KVCache(self.schedule.num_kv_slots, batch, self.config.num_kv_heads, seq_len,
                       self.config.head_dim, self.dtype, self.device)

    def _get_cache(self, batch: int, seq_len: int) -> KVCache:
        if self.max_seq_len is not None:
            seq_len = self.max_seq_len
        c = self._cache
        if c is None or c.batch != batch or c.max_seq_len != seq_len:
            self._cache = self._graph = None  # free the old cache (and a graph over it) before allocating
            self._cache = c = self.new_cache(batch, seq_len)
        return c

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, cache_start: int, kv_start: torch.Tensor,
                positions: torch.Tensor, last_only: bool = False, observer=None) -> torch.Tensor:
        """tokens: [B, T] at cache indices cache_start..cache_start+T-1; kv_start: [B] first valid cache
        index per row (left padding); positions: [B, T] rotary positions. Returns logits [B, T or 1, V].

        ``observer(step, x_in, x_out)``, if given, sees the residual stream [B, T, H] entering and
        leaving every schedule step (x_out = x_in + sublayer(norm(x_in))): the importance tools use it."""
        c = self.config
        B, T = tokens.shape
        if T == 1 and observer is None and self.compiled_decode:
            return self._decode_compiled(tokens, cache, cache_start, kv_start, positions)
        if T == 1 and observer is None and self.graph_decode and not isinstance(cache_start, torch.Tensor):
            g = self._graph
            if g is None or g.cache is not cache or g.batch != B:
                self._graph = None  # release the old graph's memory pool first
                self._graph = g = DecodeGraph(self, cache, B)
            return g(tokens, cache_start, kv_start, positions)
        eps = c.rms_norm_eps
        x = F.embedding(tokens, self.embed)
        pending = None  # last sublayer's output, added to the residual stream by the next add+norm
        if isinstance(cache_start, torch.Tensor):  # [1] int64 on the device (CUDA graph capture)
            kv_end = (cache_start + T).to(torch.int32).expand(B).contiguous()
        else:
            kv_end = torch.full((B,), cache_start + T, dtype=torch.int32, device=tokens.device)
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for step, w in zip(self.schedule.steps, self.layers):
            x, h = kernels.add_rmsnorm(pending, x, w.norm, eps)
            if isinstance(step, AttentionStep):
                q, k, v = F.linear(h, w.qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
                q = q.view(B, T, c.num_heads, c.head_dim)
                k = k.view(B, T, c.num_kv_heads, c.head_dim)
                v = v.view(B, T, c.num_kv_heads, c.head_dim)
                kc, vc = cache.k[step.slot], cache.v[step.slot]
                q = kernels.rotary_write_kv(q, k, v, self.cos, self.sin, positions, kc, vc, cache_start)
                if T == 1:
                    o = kernels.decode_attention(q[:, 0], kc, vc, kv_start, kv_end, self.scale)
                else:
                    o = kernels.prefill_attention(q, kc, vc, cache_start, kv_start, self.scale)
                pending = F.linear(o.reshape(B, T, q_dim), w.o)
            else:
                pending = F.linear(kernels.swiglu(F.linear(h, w.gate_up)), w.down)
            if observer is not None:
                observer(step, x, x + pending)
        if last_only:
            x, pending = x[:, -1:], None if pending is None else pending[:, -1:]
        _, h = kernels.add_rmsnorm(pending, x, self.final_norm, eps)
        return F.linear(h, self.lm_head)

    def _decode_compiled(self, tokens, cache: KVCache, cache_start: int, kv_start, positions):
        """One new token per row through the compiled CPU step (see ``runtime/cpu_decode.py``)."""
        c = self.config
        x = F.embedding(tokens, self.embed)
        cos = self.cos[positions].to(x.dtype)[:, :, None, :]
        sin = self.sin[positions].to(x.dtype)[:, :, None, :]
        keys = torch.arange(cache.max_seq_len, device=x.device)[None]
        mask = (keys >= kv_start[:, None]) & (keys <= cache_start)
        index = torch.tensor([cache_start], device=x.device)
        attention, mlp = cpu_decode.compiled(cpu_decode.attention_step), cpu_decode.compiled(cpu_decode.mlp_step)
        torch._dynamo.maybe_mark_dynamic(mask, 1)  # one compiled step for every cache length
        pending = torch.zeros_like(x)  # x + 0 == x: the first step compiles like every other
        for step, w in zip(self.schedule.steps, self.layers):
            if isinstance(step, AttentionStep):
                kc, vc = cache.k[step.slot], cache.v[step.slot]
                torch._dynamo.maybe_mark_dynamic(kc, 2)
                torch._dynamo.maybe_mark_dynamic(vc, 2)
                x, pending = attention(pending, x, w.norm, w.qkv, w.o, kc, vc, cos, sin, index, mask,
                                       c.num_heads, c.num_kv_heads, c.rms_norm_eps, self.scale)
            else:
                x, pending = mlp(pending, x, w.norm, w.gate_up, w.down, c.rms_norm_eps)
        return cpu_decode.compiled(cpu_decode.head_step)(pending, x, self.final_norm, self.lm_head, c.rms_norm_eps)

    def check_length(self, n: int, what: str):
        """UserError if ``n`` positions do not fit the context (``max_seq_len`` or the model's)."""
        limit = self.config.max_position_embeddings
        if self.max_seq_len is not None:
            limit = min(limit, self.max_seq_len)
        if n > limit:
            raise UserError(f"{what} needs {n} positions, but the context holds {limit} "
                            f"({'--max-seq-len' if self.max_seq_len and self.max_seq_len < self.config.max_position_embeddings else 'max_position_embeddings of the model'})")

    @torch.inference_mode()
    def logits(self, token_ids, observer=None, last_only: bool = False) -> torch.Tensor:
        """Scoring: token_ids [T] or [B, T] (list or tensor, equal lengths) -> float32 logits [B, T, V]
        ([B, 1, V] with ``last_only``). ``observer``: see ``forward``."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if T == 0:
            raise UserError("logits: empty token sequence")
        self.check_length(T, f"a sequence of {T} tokens")
        cache = self.new_cache(B, T) if self.max_seq_len is None else self._get_cache(B, T)
        kv_start = torch.zeros(B, dtype=torch.int32, device=self.device)
        positions = torch.arange(T, device=self.device)[None].expand(B, T)
        return self.forward(ids, cache, 0, kv_start, positions, last_only=last_only, observer=observer).float()

    def encode_prompts(self, prompts, chat: bool = False) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer.encode_chat if chat else self.tokenizer.encode
        return [enc(p) for p in prompts]

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop_at_eos: bool = True,
                 stop_sequences: list[str] | None = None, on_token=None) -> Generation:
        """Generate from text prompt(s) (str or list of str) or token ids (list of int lists).

        Rows are left-padded to a common length; each row's rotary positions start at 0 at its first
        real token. ``on_token(step, tokens[B])`` is called after each new token (for streaming).
        A row also finishes when its decoded text contains one of ``stop_sequences``; ``texts`` are then
        cut before the stop sequence (``tokens`` keep everything generated).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)):
            ids = self.encode_prompts(prompts, chat)
        else:
            ids = [list(p) for p in prompts]
        if not ids or any(len(p) == 0 for p in ids):
            raise UserError("prompt: empty (no tokens to start from)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"--max-new-tokens: expected an integer >= 0, got {max_new_tokens!r}")
        B, T0 = len(ids), max(len(p) for p in ids)
        self.check_length(T0 + max_new_tokens, f"a prompt of {T0} tokens plus {max_new_tokens} new tokens")
        dev = self.device
        tokens = torch.full((B, T0), self.tokenizer.pad_id, dtype=torch.long)
        for b, p in enumerate(ids):
            tokens[b, T0 - len(p):] = torch.tensor(p)
        tokens = tokens.to(dev)
        kv_start = torch.tensor([T0 - len(p) for p in ids], dtype=torch.int32, device=dev)
        positions = (torch.arange(T0, device=dev)[None] - kv_start[:, None]).clamp(min=0)
        gen = torch.Generator(device=dev)
        gen.manual_seed(0 if seed is None else seed)
        cache = self._get_cache(B, T0 + max_new_tokens)
        eos = torch.tensor(self.tokenizer.eos_ids or [-1], device=dev)

        t0 = t_step = time.perf_counter()
        out = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        prefill_s = decode_s = 0.0
        steps = 0
        if max_new_tokens > 0:
            logits = self.forward(tokens, cache, 0, kv_start, positions, last_only=True)
            for step in range(max_new_tokens):
                nxt = sample(logits[:, -1].float(), temperature, top_k, top_p, gen)
                nxt = torch.where(finished, self.tokenizer.pad_id, nxt)
                for b, t in enumerate(nxt.tolist()):
                    if not finished[b]:
                        out[b].append(t)
                if stop_at_eos:
                    finished |= torch.isin(nxt, eos)
                if stop_sequences:
                    for b in range(B):
                        if not finished[b] and _stop_at(self.tokenizer.decode(out[b][-32:]), stop_sequences) >= 0:
                            finished[b] = True
                if on_token is not None:
                    on_token(step, nxt)
                now = time.perf_counter()
                if step == 0:
                    prefill_s = now - t0
                else:
                    decode_s += now - t_step
                    steps += 1
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                t_step = time.perf_counter()
                pos = T0 + step
                logits = self.forward(nxt[:, None], cache, pos, kv_start, (pos - kv_start)[:, None].long())
        texts = [self.tokenizer.decode(o) for o in out]
        if stop_sequences:
            texts = [t[:i] if (i := _stop_at(t, stop_sequences)) >= 0 else t for t in texts]
        return Generation(out, texts, B * T0, prefill_s, decode_s, steps, finished.tolist())


class DecodeGraph:
    """The decode step (one token per row, over one KV cache) captured as a CUDA graph (gpt-fast's
    ``decode_one_token``): a call copies the token, positions, kv_start and cache index into static
    device buffers and replays every kernel launch of the step at once. The kernels read the cache
    index and the valid key range from device memory, so one capture serves every position."""

    def __init__(self, engine: Engine, cache: KVCache, batch: int):
        dev = engine.device
        self.cache, self.batch = cache, batch
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.engine, self.graph, self.logits = engine, None, None

    def _step(self):
        return self.engine.forward(self.tokens, self.cache, self.index, self.kv_start, self.positions)

    def __call__(self, tokens, cache_start: int, kv_start, positions):
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.kv_start.copy_(kv_start)
        self.index.fill_(cache_start)
        if self.graph is None:
            # Warm-up on a side stream (Triton JIT, allocator), then capture. Both run with the real
            # inputs, so the K/V they write at cache_start are the values this step writes anyway.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits.clone()  # the static output buffer is overwritten by the next replay


def _stop_at(text: str, stops: list[str]) -> int:
    """Index of the earliest stop sequence in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1
