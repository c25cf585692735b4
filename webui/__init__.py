"""A Stable Diffusion web UI whose engine owns loading, model switching and memory."""
