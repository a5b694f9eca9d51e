"""Plan + config -> schedule: the ordered sublayer steps that exist, the KV-cache layout, and the bytes.

A dropped attention sublayer has no step, no weights (its input norm included) and no KV slot;
a dropped MLP has no step and no weights (its post-attention norm included). The schedule is the one
place that counts bytes: the weights a plan loads and what one decode step reads, float or quantized
(a ``model.quant.QuantScheme`` says which weights are stored how).
"""

from dataclasses import dataclass
from math import prod

from model.config import LlamaConfig
from model.quant import QuantScheme
from runtime.plan import Plan, load_plan


@dataclass(frozen=True)
class AttentionStep:
    layer: int
    slot: int  # index into the KV cache: one slot per kept attention sublayer


@dataclass(frozen=True)
class MlpStep:
    layer: int


@dataclass(frozen=True, eq=False)
class Schedule:
    steps: tuple
    num_kv_slots: int
    plan: Plan
    config: LlamaConfig

    def weight_bytes(self, elem: int, quant: QuantScheme | None = None) -> int:
        """Bytes of the weights this schedule loads, ``elem`` bytes per float element; the weights
        ``quant`` quantizes count their quantized bytes (data, scales, offsets)."""
        shapes = needed_tensors(self.steps, self.config)
        if quant is None:
            return sum(prod(s) for s in shapes.values()) * elem
        return sum(quant.nbytes(name, s, elem) for name, s in shapes.items())

    def kv_bytes(self, elem: int, positions: int, batch: int = 1) -> int:
        """KV-cache bytes: 2 (K, V) x kept attention sublayers x batch x positions x KV heads x head dim."""
        c = self.config
        return 2 * self.num_kv_slots * batch * positions * c.num_kv_heads * c.head_dim * elem

    def step_bytes(self, elem: int, context: int, batch: int = 1, quant: QuantScheme | None = None) -> int:
        """Bytes one decode step reads at ``context`` cached positions per row: every loaded weight
        (quantized as ``quant`` says) except the embedding table (one row of it is read; a tied LM head
        reads it whole), and the KV cache of every row (always ``elem`` bytes per element)."""
        c = self.config
        embed = 0
        if not c.tie_word_embeddings:
            name, shape = "model.embed_tokens.weight", (c.vocab_size, c.hidden_size)
            embed = quant.nbytes(name, shape, elem) if quant is not None else prod(shape) * elem
        return self.weight_bytes(elem, quant) - embed + self.kv_bytes(elem, context, batch)


def compile_plan(plan: Plan, config: LlamaConfig) -> Schedule:
    if plan.num_layers != config.num_layers:
        raise ValueError(f"plan resolved for {plan.num_layers} layers, model has {config.num_layers}")
    steps, slot = [], 0
    for layer in range(config.num_layers):
        if layer not in plan.drop_attention:
            steps.append(AttentionStep(layer, slot))
            slot += 1
        if layer not in plan.drop_mlp:
            steps.append(MlpStep(layer))
    return Schedule(tuple(steps), slot, plan, config)


def full_schedule(config: LlamaConfig) -> Schedule:
    """The schedule of the same model with nothing dropped."""
    return compile_plan(load_plan(None, config.num_layers), config)


def needed_tensors(steps, config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for exactly the tensors ``steps`` run."""
    H, D, I = config.hidden_size, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.num_heads * D, config.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (config.vocab_size, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, H)
    for step in steps:
        p = f"model.layers.{step.layer}."
        if isinstance(step, AttentionStep):
            shapes |= {p + "input_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q_dim, H),
                       p + "self_attn.k_proj.weight": (kv_dim, H),
                       p + "self_attn.v_proj.weight": (kv_dim, H),
                       p + "self_attn.o_proj.weight": (H, q_dim)}
        else:
            shapes |= {p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)}
    return shapes
