"""Plan + config -> schedule: the ordered sublayer steps that exist, and the KV-cache layout.

A dropped attention sublayer has no step, no weights (its input norm included) and no KV slot;
a dropped MLP has no step and no weights (its post-attention norm included).
"""

from dataclasses import dataclass

from model.config import LlamaConfig
from runtime.plan import Plan


@dataclass(frozen=True)
class AttentionStep:
    layer: int
    slot: int  # index into the KV cache: one slot per kept attention sublayer


@dataclass(frozen=True)
class MlpStep:
    layer: int


@dataclass(frozen=True)
class Schedule:
    steps: tuple
    num_kv_slots: int
    plan: Plan

    def tensor_shapes(self, config: LlamaConfig) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> expected shape, for exactly the tensors this schedule runs."""
        return needed_tensors(self.steps, config)


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
    return Schedule(tuple(steps), slot, plan)


def needed_tensors(steps, config: LlamaConfig) -> dict[str, tuple[int, ...]]:
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
