"""The student and teacher of healing: transformers' LlamaForCausalLM, the student with dropped sublayers removed.

A dropped attention (or MLP) becomes a module that returns zeros and its norm an identity, so neither
has parameters and the layer adds nothing to the residual stream, exactly as the runtime skips it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DroppedAttention(nn.Module):
    """Stands in for a removed self_attn: adds nothing (returns zeros and no attention weights)."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class DroppedMlp(nn.Module):
    """Stands in for a removed mlp: adds nothing."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def load_hf(checkpoint) -> nn.Module:
    """The checkpoint as a float32 LlamaForCausalLM (eager attention: the same on every CPU)."""
    from transformers import LlamaForCausalLM

    from model.weights import require_float

    model = LlamaForCausalLM.from_pretrained(require_float(checkpoint, "healing (a transformers student and teacher)"),
                                             dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def remove_sublayers(model: nn.Module, plan) -> nn.Module:
    """Replace ``plan``'s dropped sublayers (and their norms) of ``model`` in place; returns it."""
    for i, layer in enumerate(model.model.layers):
        if i in plan.drop_attention:
            layer.self_attn, layer.input_layernorm = DroppedAttention(), nn.Identity()
        if i in plan.drop_mlp:
            layer.mlp, layer.post_attention_layernorm = DroppedMlp(), nn.Identity()
    return model


def set_trainable(model: nn.Module, train: str, rank: int = 8) -> nn.Module:
    """``norms``: RMSNorm weights only; ``lora``: LoRA adapters of rank ``rank`` on the kept projections
    (peft; returns the wrapped model); ``all``: every parameter."""
    if train == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS)))
        return model
    for name, p in model.named_parameters():
        p.requires_grad = train == "all" or name.endswith("norm.weight")
    return model


def merged_state(model: nn.Module) -> dict:
    """name -> tensor of the plain LlamaForCausalLM (LoRA merged into the weights), float32, detached."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over tokens of KL(teacher || student) at temperature T; logits [B, S, V]."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, -1)
    p = F.log_softmax(teacher_logits.float() / t, -1)
    return (p.exp() * (p - s)).sum(-1).mean() * t * t


def boundary_layers(plan) -> list[int]:
    """Indices i of the hidden-state list (input of layer i; i = L is the last layer's output) right
    after a layer with a dropped sublayer: where the residual-stream MSE is taken."""
    return sorted({i + 1 for i in plan.drop_attention | plan.drop_mlp})
