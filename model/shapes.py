"""Named Llama shapes with random weights, to measure the latency of models whose weights we lack.

Configs are the published ``config.json`` fields of Llama-2-7B, Llama-2-13B and Llama-3-8B. Weights
are random normal (std 0.02; norm weights 1 + noise), never zero, so no kernel can skip work.
"""

import torch

from model.config import LlamaConfig, parse_config

_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {
    "llama2-7b": {**_LLAMA2, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "intermediate_size": 11008},
    "llama2-13b": {**_LLAMA2, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40, "intermediate_size": 13824},
    "llama3-8b": {**_LLAMA2, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                  "eos_token_id": 128001},
}


def shape_config(name: str) -> LlamaConfig:
    return parse_config(SHAPES[name], where=f"shape {name!r}")


class RandomWeights:
    """Stands in for ``model.weights.CheckpointReader``: every tensor asked for is random, made on the
    target device (a 7B model in seconds on a GPU)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.names_read: list[str] = []

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        return self.read_cat([(name, shape)], dtype, device)

    def read_cat(self, parts, dtype: torch.dtype, device) -> torch.Tensor:
        out = []
        for name, shape in parts:
            gen = torch.Generator(device=device).manual_seed(self.seed + len(self.names_read))
            t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
            out.append((1 + 0.1 * t if name.endswith("norm.weight") else 0.02 * t).to(dtype))
            self.names_read.append(name)
        return out[0] if len(out) == 1 else torch.cat(out)

    def close(self):
        pass
