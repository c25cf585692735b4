"""The checkpoint merger (A1111's tab, and an API route): checkpoints merged, a VAE and LoRAs baked in, written a
tensor at a time (``merger``); the LoRA updates as the checkpoint's own key names (``bake``); safetensors read and
written without the whole file in memory (``streamed``)."""
