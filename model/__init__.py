"""What a Llama checkpoint is: config, weights, tokenizer, GGUF import."""
