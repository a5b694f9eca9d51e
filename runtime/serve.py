"""An OpenAI-compatible server over one engine with continuous batching (``runtime.scheduler``).

    python -m runtime.serve --model smollm2-135m-instruct --plan imp-attn10 --kv-memory 256M --max-batch 16

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models (the model,
its plan and KV capacity), GET /health, GET /metrics (Prometheus text). Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``): 400 for bad fields, 401 for a wrong API key,
404 for another model's name, 429 when the wait queue is full.
"""

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass

from model.errors import UserError, cli_main
from model.sizes import parse_size
from runtime.generate import add_quant_args
from runtime.scheduler import QueueFull, SamplingParams, Scheduler, Sequence, pool_slots
from runtime.threads import add_threads_arg

MAX_SEED = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request validation -------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(param: str, expected: str, value) -> ApiError:
    shown = json.dumps(value)
    return ApiError(400, f"'{param}': expected {expected}, got {shown[:80]}", param)


def sampling_params(body: dict, chat: bool) -> SamplingParams:
    """The sampling fields of a request body, checked (ApiError 400 naming the field)."""
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = next((body[k] for k in keys if body.get(k) is not None), 16)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", "an integer >= 1", max_tokens)
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("temperature", "a number in 0..2 (0 means greedy)", temperature)
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", "a number in (0, 1]", top_p)
    top_k = 0 if body.get("top_k") is None else body["top_k"]
    if not _is_int(top_k) or top_k < -1:
        raise _bad("top_k", "an integer >= 0 (0 or -1 means off)", top_k)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise _bad("seed", f"an integer in 0..{MAX_SEED}", seed)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "a string or a list of up to 4 strings", body.get("stop"))
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", "1 (one choice per prompt)", n)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", "true or false", stream)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "true or false", ignore_eos)
    return SamplingParams(max_tokens, float(temperature), max(top_k, 0), float(top_p), seed, [s for s in stop if s],
                          ignore_eos)


def completion_prompts(body: dict, engine) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions body: a string, a list of strings, a list of token
    ids or a list of such lists."""
    if "prompt" not in body:
        raise ApiError(400, "'prompt': required (a string, a list of strings or token ids)", "prompt")
    p = body["prompt"]
    V = engine.config.vocab_size
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = p
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
        prompts = p
    else:
        raise _bad("prompt", "a string, a non-empty list of strings, or token ids (a list of integers or of "
                   "integer lists)", p)
    ids = []
    for q in prompts:
        if isinstance(q, str):
            q = engine.tokenizer.encode(q)
        elif any(not 0 <= t < V for t in q):
            raise ApiError(400, f"'prompt': token ids must lie in 0..{V - 1} (the vocabulary)", "prompt")
        if not q:
            raise ApiError(400, "'prompt': empty (no tokens to start from)", "prompt")
        ids.append(list(q))
    return ids


def chat_prompt(body: dict, engine) -> list[int]:
    """Token ids of a /v1/chat/completions body's messages under the model's chat template."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list of {\"role\", \"content\"} objects", msgs)
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "an object with a string 'role'", m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad(f"messages[{i}].content", "a string or a list of {\"type\": \"text\", \"text\"} parts", content)
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "a string", content)
        clean.append({"role": m["role"], "content": content})
    tok = engine.tokenizer
    if not tok.chat_template:
        raise ApiError(400, "this model has no chat template: start the server with --chat-template FILE, "
                       "or use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(clean)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ApiError(400, "'messages': the chat template rendered no tokens", "messages")
    return ids


# ---- the app -------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics on their own registry (several apps may live in one process)."""

    def __init__(self, scheduler_counts, slots: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("sublayer_requests_running", "Sequences holding a KV row", registry=r).set_function(
            lambda: scheduler_counts()[0])
        Gauge("sublayer_requests_queued", "Sequences waiting for a KV row", registry=r).set_function(
            lambda: scheduler_counts()[1])
        Gauge("sublayer_kv_slots_used", "KV pool rows in use", registry=r).set_function(lambda: scheduler_counts()[0])
        Gauge("sublayer_kv_slots_total", "KV pool rows", registry=r).set(slots)
        self.tokens = Counter("sublayer_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("sublayer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.requests = Counter("sublayer_requests", "Requests finished, by outcome", ["outcome"], registry=r)
        buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("sublayer_time_to_first_token_seconds", "Arrival to first token", buckets=buckets,
                              registry=r)
        self.token_latency = Histogram("sublayer_time_per_output_token_seconds", "Time between tokens",
                                       buckets=buckets, registry=r)


@dataclass
class ServerInfo:
    model_id: str
    slots: int
    max_seq_len: int
    full_slots: int
    kv_memory: int
    bytes_per_position: int


def capacity(engine, kv_memory: int, max_seq_len: int, max_batch: int) -> ServerInfo:
    slots = pool_slots(engine, kv_memory, max_seq_len, max_batch)
    full_row = engine.kv_bytes(max_seq_len, 1, full=True)
    full_slots = min(max_batch, kv_memory // full_row) if full_row else max_batch
    return ServerInfo("", slots, max_seq_len, full_slots, kv_memory, engine.kv_bytes(1, 1))


def memory_rows(engine, info: ServerInfo, full: bool = False) -> int | None:
    """Rows of max_seq_len positions --kv-memory holds, uncapped by --max-batch (None: no KV at all)."""
    row = engine.kv_bytes(info.max_seq_len, 1, full=full)
    return info.kv_memory // row if row else None


def capacity_line(engine, info: ServerInfo) -> str:
    """The startup line: rows x positions, and the plan's gain in rows over ``full`` in the same bytes."""
    kept = len(engine.plan.kept_attention)
    L = engine.config.num_layers
    full_row = engine.kv_bytes(info.max_seq_len, 1, full=True)
    row = engine.kv_bytes(info.max_seq_len, 1)
    uncapped = info.kv_memory // row if row else math.inf
    gain = f"{full_row / row:.2f}x the rows of full" if row else "no KV cache at all"
    cap = f"; capped by --max-batch (the memory holds {uncapped})" if uncapped > info.slots else ""
    return (f"KV pool: {info.slots} slots x {info.max_seq_len} positions = {info.slots * info.max_seq_len} positions "
            f"in {row * info.slots / 2**20:.1f} MiB of --kv-memory {info.kv_memory / 2**20:.1f} MiB "
            f"({info.bytes_per_position} bytes/position: {kept}/{L} attention sublayers kept; {gain}: full would "
            f"hold {info.kv_memory // full_row if full_row else 0} slots{cap})")


def create_app(engine, model_id: str, kv_memory: int, max_batch: int, max_seq_len: int | None = None,
               max_queue: int = 64, prefill_chunk: int = 256, api_key: str | None = None):
    """The FastAPI app serving ``engine`` under the name ``model_id``; its lifespan starts and stops
    the scheduler thread (``app.state.scheduler``)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if engine.tokenizer is None:
        raise UserError("--model: serving needs a checkpoint with a tokenizer")
    max_seq_len = max_seq_len or engine.max_seq_len or min(2048, engine.config.max_position_embeddings)
    info = capacity(engine, kv_memory, max_seq_len, max_batch)
    info.model_id = model_id
    scheduler = Scheduler(engine, info.slots, max_seq_len, max_queue, prefill_chunk)
    metrics = Metrics(scheduler.counts, info.slots)
    scheduler.metrics = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="sublayer", lifespan=lifespan)
    app.state.scheduler, app.state.info, app.state.metrics = scheduler, info, metrics

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    async def read_body(request: Request) -> dict:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise _bad("model", "a string (the served model's id)", body.get("model"))
        if body["model"] != model_id:
            raise ApiError(404, f"The model '{body['model'][:80]}' does not exist (this server serves "
                           f"'{model_id}')", "model", "model_not_found")
        return body

    def check_context(ids: list[int], params: SamplingParams):
        if len(ids) + params.max_tokens > max_seq_len:
            raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens (--max-seq-len); "
                           f"the request asks for {len(ids) + params.max_tokens} ({len(ids)} in the prompt, "
                           f"{params.max_tokens} in max_tokens)", "prompt", "context_length_exceeded")

    async def serve(request: Request, chat: bool):
        try:
            body = await read_body(request)
            params = sampling_params(body, chat)
            prompts = [chat_prompt(body, engine)] if chat else completion_prompts(body, engine)
            for ids in prompts:
                check_context(ids, params)
        except ApiError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i, ids in enumerate(prompts):
            def emit(event, i=i):
                loop.call_soon_threadsafe(events.put_nowait, (i, event))
            seqs.append(Sequence(ids, params, emit))
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            metrics.requests.labels("rejected").inc()
            return error(ApiError(429, str(e), code="rate_limit_exceeded", kind="rate_limit_error"))
        metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        usage = lambda: {"prompt_tokens": sum(len(s.prompt_ids) for s in seqs),  # noqa: E731
                         "completion_tokens": sum(len(s.out) for s in seqs),
                         "total_tokens": sum(len(s.prompt_ids) + len(s.out) for s in seqs)}
        kind = "chat.completion" if chat else "text_completion"

        async def next_event():
            """The next (index, event), or None once every sequence has finished."""
            return await events.get()

        if body.get("stream"):
            include_usage = bool(isinstance(body.get("stream_options"), dict)
                                 and body["stream_options"].get("include_usage"))

            def chunk(i, text=None, finish=None, first=False):
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
                obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_id,
                       "choices": [choice]}
                return f"data: {json.dumps(obj)}\n\n"

            async def stream():
                left = len(seqs)
                try:
                    if chat:
                        for i in range(len(seqs)):
                            yield chunk(i, first=True)
                    while left:
                        i, (what, value) = await next_event()
                        if what == "text":
                            yield chunk(i, value)
                            continue
                        left -= 1
                        if what == "error":
                            metrics.requests.labels("error").inc()
                            yield f"data: {json.dumps(ApiError(500, value, kind='server_error').body())}\n\n"
                        else:
                            metrics.requests.labels(value).inc()
                            yield chunk(i, finish=value)
                    if include_usage:
                        obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                               "model": model_id, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(obj)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    for s in seqs:  # a client gone mid-stream: free its rows at the next step
                        if s.finish_reason is None:
                            s.cancel()
                            metrics.requests.labels("cancelled").inc()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        texts, reasons, failed = [""] * len(seqs), [None] * len(seqs), None
        left, checked = len(seqs), time.monotonic()
        try:
            while left:
                try:
                    i, (what, value) = await asyncio.wait_for(next_event(), timeout=0.25)
                except asyncio.TimeoutError:
                    what = None
                if time.monotonic() - checked > 0.25:  # a client gone before its answer frees its rows
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        for s in seqs:
                            s.cancel()
                        metrics.requests.labels("cancelled").inc()
                        return None
                if what is None:
                    continue
                if what == "text":
                    texts[i] += value
                    continue
                left -= 1
                if what == "error":
                    failed = value
                else:
                    reasons[i] = value
        finally:
            for s in seqs:
                if s.finish_reason is None:
                    s.cancel()
        if failed is not None:
            metrics.requests.labels("error").inc()
            return error(ApiError(500, failed, kind="server_error"))
        for r in reasons:
            metrics.requests.labels(r).inc()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_id,
                             "choices": choices, "usage": usage()})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        plan = engine.plan
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": 0, "owned_by": "sublayer",
            "max_model_len": max_seq_len, "vocab_size": engine.config.vocab_size,
            "plan": {"name": plan.name, "describe": plan.describe(),
                     "dropped": {"attention": sorted(plan.drop_attention), "mlp": sorted(plan.drop_mlp)}},
            "kv": {"slots": info.slots, "positions_per_slot": max_seq_len, "bytes_per_position": info.bytes_per_position,
                   "kv_memory": info.kv_memory, "full_slots": info.full_slots,
                   "memory_rows": memory_rows(engine, info), "full_memory_rows": memory_rows(engine, info, True),
                   "capacity_vs_full": (engine.kv_bytes(1, 1, full=True) / info.bytes_per_position
                                        if info.bytes_per_position else None)},
        }]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return error(ApiError(405, f"method {request.method} not allowed on {request.url.path}"))

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or known model name (default: the default model)")
    p.add_argument("--plan", default=None, help="a plan JSON path or a preset name (default: full)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-memory", default="256M", help="bytes for the KV pool, binary K/M/G suffixes (default 256M)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per sequence, prompt + new tokens (default: the context, at most 2048)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a row before 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step between decode steps (default 256)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file for models without one")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    add_threads_arg(p)
    add_quant_args(p)
    return p.parse_args(argv)


def load_engine(args):
    """The engine of ``args`` (checked flags), with ``--chat-template`` applied."""
    import runtime

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1), ("--port", args.port, 0)):
        if value < low:
            raise UserError(f"{flag}: expected an integer >= {low}, got {value}")
    template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--chat-template: {args.chat_template} is not readable text ({e})") from None
    engine = runtime.load(args.model, args.plan, args.dtype, args.device, args.max_seq_len,
                          compile=not args.no_compile, quant=args.quant, group_size=args.group_size,
                          quant_head=args.quant_head, threads=args.threads)
    if engine.tokenizer is None:
        raise UserError("--model: serving needs a checkpoint with a tokenizer")
    if template is not None:
        engine.tokenizer.chat_template = template
        engine.tokenizer._template_source = args.chat_template
    return engine


@cli_main
def main(argv=None) -> int:
    import uvicorn

    args = parse_args(argv)
    kv_memory = parse_size(args.kv_memory, "--kv-memory", binary=True)
    engine = load_engine(args)
    model_id = args.model or "smollm2-135m-instruct"
    app = create_app(engine, model_id, kv_memory, args.max_batch, args.max_seq_len, args.max_queue,
                     args.prefill_chunk, args.api_key)
    print(f"model: {model_id}", file=sys.stderr)
    print(f"plan: {engine.plan.describe()}", file=sys.stderr)
    if engine.quant is not None:
        print(f"weights: {engine.weight_bytes / 2**20:.1f} MiB; {engine.quant.describe()}", file=sys.stderr)
    print(capacity_line(engine, app.state.info), file=sys.stderr)
    if engine.decode_mode != "eager":
        seconds = app.state.scheduler.warm_up()
        print(f"compile: {seconds:.1f} s (decode step, {engine.decode_mode}, batch sizes up to "
              f"{app.state.info.slots})", file=sys.stderr)
    print(f"listening on http://{args.host}:{args.port}/v1 (SIGTERM or Ctrl-C drains running requests)",
          file=sys.stderr)
    # uvicorn's own SIGTERM/SIGINT handling stops accepting, waits for running requests, then runs the
    # lifespan shutdown (the scheduler stops after the last response).
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
