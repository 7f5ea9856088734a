"""A1111's "Original" emphasis: hidden states times token weights, rescaled to the chunk's original mean."""

from __future__ import annotations

import torch


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden (k, 77, C) text encoder output, weights (k, 77) -> (k, 77, C).

    Each chunk is multiplied by its tokens' weights, then scaled so its mean over (77, C) is what it was before:
    A1111 encodes one chunk at a time and takes the mean over that call's whole output.
    """
    hidden = hidden.float()
    before = hidden.mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
    weighted = hidden * weights.to(hidden.device, torch.float32)[:, :, None]
    return weighted * (before / weighted.mean(dim=(1, 2), keepdim=True))
