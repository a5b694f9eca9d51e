"""What users do around a run: GGUF import, importance scores and plans, lm-eval adapter, perplexity."""
