"""Train the demo model's textual-inversion embedding: ``python -m webui.demo.train_embedding --out FILE`` (a few
minutes on a CPU).

A learned word for the "dusk" style (the background darkens downwards), the embedding's counterpart of the dusk
LoRA: the shipped checkpoint is frozen, and only ``vectors`` token vectors are trained, put after each dusk picture's
caption (``<caption>, <vectors>``) as the prompt ``<caption>, demo-dusk`` puts them. Written as A1111 writes an SD1
embedding (``emb_params``, with its name, step and checkpoint), in float16.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from webui.demo.derive import load_checkpoint
from webui.demo.shapes import all_scenes, draw
from webui.demo.train import SD1_SCALE, diffusion_loss, lr_at, noise_levels, unet_denoise
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.loading.demo import ASSETS, DEMO_NAME

PLACEHOLDER = 0  # the token id standing for the learned vectors ("!", which no caption has)


class LearnedVectors(nn.Module):
    """The text encoder's token embedding with ``PLACEHOLDER`` tokens replaced by trainable vectors, in order."""

    def __init__(self, embedding: nn.Embedding, start: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.vectors = nn.Parameter(start.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.embedding(ids)
        mask = ids == PLACEHOLDER
        return out.masked_scatter(mask[..., None], self.vectors.to(out.dtype).repeat(int(mask.sum()) // len(self.vectors), 1))


def caption_tokens(captions: list[str], vectors: int) -> torch.Tensor:
    """Each caption with ``vectors`` placeholders after it, as the prompt ``<caption>, <name>`` is read."""
    tokenizer = clip_tokenizer()
    rows = []
    for caption in captions:
        ids = tokenizer(f"{caption},", truncation=True, max_length=77 - vectors).input_ids
        ids = ids[:-1] + [PLACEHOLDER] * vectors + ids[-1:]
        rows.append(ids + [tokenizer.pad_token_id] * (77 - len(ids)))
    return torch.tensor(rows)


def train(out: Path, vectors: int = 2, pictures: int = 2048, steps: int = 400, batch: int = 32, lr: float = 0.02,
          seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = load_checkpoint(ASSETS / DEMO_NAME)
    unet, vae, text = model.denoiser.eval(), model.vae.eval(), model.text_encoders[0].model.eval()
    for module in (unet, vae, text):
        module.requires_grad_(False)
    scenes = random.Random(seed).choices(all_scenes(), k=pictures)
    with torch.no_grad():
        latents = torch.cat([vae.encode(draw(scenes[i:i + 256], 128, style="dusk", seed=seed + i,
                                             supersample=2)).latent_dist.mean * SD1_SCALE
                             for i in range(0, pictures, 256)])
    tokens = caption_tokens([scene.caption() for scene in scenes], vectors)
    embeddings = getattr(text, "text_model", text).embeddings  # (newer transformers: no text_model level)
    word = clip_tokenizer()("dusk").input_ids[1]  # start from the word's own vector
    learned = LearnedVectors(embeddings.token_embedding, embeddings.token_embedding.weight[word].repeat(vectors, 1))
    embeddings.token_embedding = learned
    optimizer = torch.optim.AdamW([learned.vectors], lr=lr, weight_decay=0.0)
    alphas_cumprod = noise_levels(torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed + 1)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, 20)
        index = torch.randint(0, pictures, (batch,), generator=generator)
        loss = diffusion_loss(unet_denoise(unet), text, latents[index], tokens[index], alphas_cumprod, generator,
                              5.0, high_noise=0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    save_file({"emb_params": learned.vectors.detach().to(torch.float16).contiguous()}, str(out),
              metadata={"name": out.stem, "step": str(steps), "sd_checkpoint_name": DEMO_NAME})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--pictures", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args(argv)
    train(args.out, args.vectors, args.pictures, args.steps, args.batch, args.lr)


if __name__ == "__main__":
    main()
