"""A1111's Soft Inpainting (its built-in extension; Forge has it too): a blurred mask's shades are kept, not rounded.

During denoising the kept part is blended in by the mask raised to a power that follows the noise level (the
original holds more early, the generation more late), and each blend keeps the vectors' lengths from shrinking
(``blend``). After it, the original is laid back over the result where the result changed little from it, judged
latent pixel by latent pixel (``composite_masks``), instead of through the blurred mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from webui.errors import UserError

# A1111's labels: the UI's, and the infotext's (each "Soft inpainting " + the label in lower case)
ENABLED_LABEL = "Soft inpainting enabled"
LABELS = ("Schedule bias", "Preservation strength", "Transition contrast boost", "Mask influence",
          "Difference threshold", "Difference contrast")
INFOTEXT_KEYS = tuple(f"Soft inpainting {label.lower()}" for label in LABELS)
SCRIPT_NAME = "soft inpainting"  # its name in a request's alwayson_scripts
# a latent pixel's difference is judged over its neighbourhood: a Gaussian of this spread, cut beyond this radius
KERNEL_SPREAD, KERNEL_RADIUS = 1.5, 2


# A1111's sliders' ranges and steps, in the settings' order
RANGES = ((0.0, 8.0), (0.0, 8.0), (1.0, 32.0), (0.0, 1.0), (0.0, 8.0), (0.0, 8.0))
SLIDER_STEPS = (0.1, 0.05, 0.5, 0.05, 0.25, 0.25)


@dataclass(frozen=True)
class SoftInpainting:
    """The six settings, by A1111's defaults."""

    schedule_bias: float = 1.0  # the power of the noise level in the blend's exponent
    preservation_strength: float = 0.5  # the exponent's scale: how much partly masked parts keep the original
    transition_contrast_boost: float = 4.0  # the power the vectors' lengths are blended at (1: linear)
    mask_influence: float = 0.0  # how much the mask biases the difference threshold
    difference_threshold: float = 0.5  # the difference at which the original is half laid over the result
    difference_contrast: float = 2.0  # how sharp that transition is

    def as_infotext(self) -> dict[str, float | bool]:
        return {ENABLED_LABEL: True, **dict(zip(INFOTEXT_KEYS, self.values()))}

    def values(self) -> tuple[float, ...]:
        return (self.schedule_bias, self.preservation_strength, self.transition_contrast_boost, self.mask_influence,
                self.difference_threshold, self.difference_contrast)

    def blend(self, original: torch.Tensor, current: torch.Tensor, repaint: torch.Tensor,
              sigma: float) -> torch.Tensor:
        """``current`` where ``repaint`` is 1, ``original`` where it is 0, and between them by ``repaint`` raised to
        sigma ** schedule_bias x preservation_strength; each latent pixel's length blended at the power
        ``transition_contrast_boost`` (float64: the powers are large) instead of shrinking as a linear blend's."""
        t = repaint.clamp(0, 1) ** (sigma ** self.schedule_bias * self.preservation_strength)
        linear = original * (1 - t) + current * t
        power, weight = self.transition_contrast_boost, t[:, :1].double()

        def length(x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)

        wanted = (length(original) ** power * (1 - weight) + length(current) ** power * weight) ** (1 / power)
        return linear * (wanted / (length(linear) + 1e-5)).to(linear.dtype)

    def composite_masks(self, original: torch.Tensor, result: torch.Tensor, repaint: torch.Tensor,
                        size: tuple[int, int]) -> list[Image.Image]:
        """Per image of ``result`` (B, C, h, w latents), an "L" mask of ``size``: 255 where the result shows, 0 where
        the original is laid over it, by how far each latent pixel moved from ``original`` (its neighbourhood's
        upper tenth, then their middle half: single outliers do not count) against the difference threshold, which
        the mask biases by ``mask_influence``."""
        kept = 1 - repaint[0, 0].clamp(0, 1).double() ** (self.preservation_strength / 2)
        scalar = 0.5 * (1 - self.mask_influence) + kept * self.mask_influence
        half_distance = self.difference_threshold * (scalar / (1.00001 - scalar)).cpu().numpy()
        distances = torch.linalg.vector_norm((result - original).double(), dim=1).cpu().numpy()
        kernel = gaussian_kernel(KERNEL_SPREAD, KERNEL_RADIUS)
        masks = []
        for distance in distances:
            distance = weighted_percentile_filter(distance, kernel, 0.9, 1.0)
            distance = weighted_percentile_filter(distance, kernel, 0.25, 0.75)
            with np.errstate(divide="ignore", over="ignore"):
                opacity = 1 - smootherstep(1 / (1 + (distance / half_distance) ** self.difference_contrast))
            opacity = np.nan_to_num(opacity, nan=0.0)  # no change against a threshold of 0: the original
            mask = Image.fromarray((255 * opacity).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
            masks.append(mask.filter(ImageFilter.GaussianBlur(radius=4)))
        return masks


def checked_soft_inpainting(value: object) -> SoftInpainting | None:
    """``value`` as settings within A1111's ranges: settings, their six numbers, or A1111's script args (on or off,
    then the six; off: None). Anything else is a UserError naming soft_inpainting."""
    values = value.values() if isinstance(value, SoftInpainting) else value
    if isinstance(values, (list, tuple)) and len(values) == len(LABELS) + 1 and isinstance(values[0], bool):
        if not values[0]:
            return None
        values = values[1:]
    if not isinstance(values, (list, tuple)) or len(values) != len(LABELS):
        raise UserError(f"must be its {len(LABELS)} settings ({', '.join(LABELS)}), got {value!r}",
                        field="soft_inpainting")
    for label, number, (low, high) in zip(LABELS, values, RANGES):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high:
            raise UserError(f"{label} must be a number from {low:g} to {high:g}, got {number!r}",
                            field="soft_inpainting")
    return SoftInpainting(*(float(number) for number in values))


def gaussian_kernel(spread: float, radius: int) -> np.ndarray:
    """A (2 radius + 1)² Gaussian, 1 at its centre and brought to 0 one pixel beyond ``radius``."""
    offsets = np.arange(-radius, radius + 1)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    floor = np.exp(-((radius + 1) ** 2) / spread ** 2)
    return np.maximum(0.0, (np.exp(-squared / spread ** 2) - floor) / (1 - floor))


def weighted_percentile_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float,
                               min_width: float = 1.0) -> np.ndarray:
    """Each pixel: the mean of its neighbourhood's values between the ``low`` and ``high`` fractions of their
    weights (the kernel's, stacked in the values' order), over at least ``min_width`` of weight. Outside the image
    the kernel weighs nothing."""
    radius = kernel.shape[0] // 2
    height, width = image.shape
    padded = np.pad(image, radius)
    inside = np.pad(np.ones_like(image), radius)
    values = np.stack([padded[dy:dy + height, dx:dx + width] for dy in range(2 * radius + 1)
                       for dx in range(2 * radius + 1)], axis=-1)
    weights = np.stack([inside[dy:dy + height, dx:dx + width] * kernel[dy, dx] for dy in range(2 * radius + 1)
                        for dx in range(2 * radius + 1)], axis=-1)
    order = np.argsort(values, axis=-1, kind="stable")
    values, weights = np.take_along_axis(values, order, -1), np.take_along_axis(weights, order, -1)
    top = np.cumsum(weights, axis=-1)
    bottom, total = top - weights, top[..., -1:]
    start, end = total * low, total * high
    narrow = end - start < min_width
    centre = (start + end) / 2
    start = np.where(narrow, centre - min_width / 2, start)
    end = np.where(narrow, centre + min_width / 2, end)
    start, end = np.where(end > total, total - min_width, start), np.minimum(end, total)
    start = np.maximum(start, 0)
    end = np.where(start == 0, np.maximum(end, np.minimum(min_width, total)), end)
    overlap = np.clip(np.minimum(end, top) - np.maximum(start, bottom), 0, None)
    weight = overlap.sum(-1)
    return np.where(weight > 0, (values * overlap).sum(-1) / np.where(weight > 0, weight, 1), 0.0)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """Ken Perlin's smootherstep on [0, 1]."""
    return x * x * x * (x * (6 * x - 15) + 10)
