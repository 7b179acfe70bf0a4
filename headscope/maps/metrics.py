"""How well a word map segments its object: the pointing game and two published mask protocols.

    pointing        the map's maximum lies inside the object's mask (first maximum in row-major order)
    daam_iou        DAAM (Tang et al. 2022): the map min-max normalised and thresholded at tau
                    (`daam.threshold`: >= tau), IoU with the mask; DAAM's mIoU is the mean over
                    word-mask pairs
    mean_threshold  ConceptAttention (Helbling et al. 2025), after the ImageNet-Segmentation protocol
                    of Chefer et al.: mask = map > its own mean; pixel accuracy, the mean of the
                    foreground and the background IoU, and the average precision of the map's pixel
                    scores against the mask (`sklearn.metrics.average_precision_score`). Here every
                    number is computed per word-mask pair and averaged over pairs; Chefer et al. pool
                    pixel accuracy and IoU over the whole data set instead.

Maps are `[H, W]` (torch or numpy, any real dtype), masks `[H, W]` bool of the same shape. The
`*_stack` forms score `[n, H, W]` maps against one mask at once.
"""
from __future__ import annotations

import numpy as np
import torch


def pointing(heat_map, mask) -> bool:
    """True when the map's (first) maximum lies inside `mask`."""
    return bool(pointing_stack(_as_tensor(heat_map)[None], mask)[0])


def iou(predicted, mask) -> float:
    """|predicted AND mask| / |predicted OR mask| of two bool masks; 0.0 when both are empty."""
    predicted, mask = np.asarray(predicted, bool), np.asarray(mask, bool)
    return float((predicted & mask).sum() / max(1, (predicted | mask).sum()))


def daam_iou(heat_map, mask, tau: float = 0.4) -> float:
    """IoU with `mask` of the map normalised to [0, 1] and thresholded at >= tau (DAAM's protocol)."""
    return float(daam_iou_stack(_as_tensor(heat_map)[None], mask, (tau,))[0, 0])


def mean_threshold(heat_map, mask) -> dict[str, float]:
    """ConceptAttention's protocol for one pair: {"pixel_accuracy", "miou", "ap"}.

    mask of the map = map > mean(map); miou = (IoU of the foregrounds + IoU of the backgrounds) / 2;
    ap = average precision of the map's values as scores of the mask's pixels (nan if the mask is empty).
    """
    from sklearn.metrics import average_precision_score

    scores = _as_tensor(heat_map).double().numpy()
    mask = np.asarray(mask, bool)
    predicted = scores > scores.mean()
    return {"pixel_accuracy": float((predicted == mask).mean()),
            "miou": (iou(predicted, mask) + iou(~predicted, ~mask)) / 2,
            "ap": float(average_precision_score(mask.ravel(), scores.ravel())) if mask.any() else float("nan")}


def pointing_stack(heat_maps: torch.Tensor, mask) -> np.ndarray:
    """[n] bool: for each map of `[n, H, W]`, whether its first maximum lies inside `mask`."""
    flat_mask = torch.as_tensor(np.asarray(mask, bool)).flatten()
    return flat_mask[heat_maps.flatten(1).argmax(dim=1)].numpy()


def daam_iou_stack(heat_maps: torch.Tensor, mask, taus) -> np.ndarray:
    """[n, len(taus)] DAAM IoUs of `[n, H, W]` maps against one mask, one column per tau."""
    flat = heat_maps.flatten(1)  # [n, pixels]
    flat = flat if flat.is_floating_point() else flat.double()
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    # as `daam.normalize` computes it, in the map's own dtype, so the masks equal `daam.threshold`'s
    normalised = torch.where(high > low, (flat - low) / torch.where(high > low, high - low, 1), 0)
    target = torch.as_tensor(np.asarray(mask, bool)).flatten()
    taus = torch.as_tensor(list(taus), dtype=normalised.dtype)
    predicted = normalised[:, None, :] >= taus[None, :, None]  # [n, taus, pixels]
    inter = (predicted & target).sum(dim=-1)
    union = (predicted | target).sum(dim=-1).clamp_min(1)
    return (inter.double() / union).numpy()


def _as_tensor(heat_map) -> torch.Tensor:
    return heat_map.detach().cpu() if isinstance(heat_map, torch.Tensor) else torch.as_tensor(np.asarray(heat_map))
