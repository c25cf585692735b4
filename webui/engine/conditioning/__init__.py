"""Prompts to conditioning: prompt parsing and weighting, tokenizers, text encoders (CLIP, T5)."""
