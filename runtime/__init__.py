"""What to run: plans, their schedule, the engine, and the ``load`` entry point.

    import runtime
    engine = runtime.load("smollm2-135m-instruct", plan="attn66")
    print(engine.generate("The capital of France is", max_new_tokens=20).texts[0])
"""


from runtime.threads import bounded_spin

bounded_spin()  # before torch loads OpenMP (runtime.threads)


def load(model=None, plan=None, dtype="auto", device="auto", max_seq_len=None, show_progress=True, compile=True,
         quant=None, group_size=None, quant_head=False, threads=None):
    """Build an ``Engine``; see ``runtime.engine.load``. (Imported lazily so ``python -m runtime.x`` is clean.)"""
    from runtime.engine import load as _load

    return _load(model, plan, dtype, device, max_seq_len, show_progress, compile, quant=quant, group_size=group_size,
                 quant_head=quant_head, threads=threads)


def __getattr__(name):
    if name == "Engine":
        from runtime.engine import Engine

        return Engine
    raise AttributeError(name)
