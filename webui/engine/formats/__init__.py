"""File formats: safetensors and GGUF readers that check every header, architecture detection from the tensors, key maps."""
