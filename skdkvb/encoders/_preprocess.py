"""Image preprocessing as batched torch operations: data configs, uint8 to float, resize, crop, normalise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# timm's eval transform default when a config has no crop_pct.
_DEFAULT_CROP_PCT = 0.875
# F.interpolate has no lanczos/hamming/box; these are the closest it offers.
_INTERPOLATION = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "bicubic",
    "hamming": "bilinear",
    "box": "area",
    "area": "area",
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_data_config(model) -> dict:
    """The eval data config of a timm model, from timm's public ``resolve_model_data_config``."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}


def torchvision_data_config(name: str) -> dict:
    """The eval data config of a torchvision classification model, from its default weights' transforms."""
    from torchvision.models import get_model_weights

    try:
        t = get_model_weights(name).DEFAULT.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        return {
            "input_size": (3, crop, crop),
            "interpolation": str(t.interpolation.value),
            "mean": tuple(float(m) for m in t.mean),
            "std": tuple(float(s) for s in t.std),
            "crop_pct": crop / resize,
            "crop_mode": "center",
        }
    except Exception:  # models without weights or with another transform
        return {
            "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": _IMAGENET_MEAN,
            "std": _IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center",
        }  # fmt: skip


def complete_data_config(cfg) -> dict:
    """Fill defaults for a user-given (possibly partial) data config."""
    if not isinstance(cfg, dict):
        raise TypeError(f"data_config must be a dict, got {type(cfg).__name__}.")
    if "input_size" not in cfg:
        raise ValueError("data_config needs an 'input_size' of the form (channels, height, width).")
    size = tuple(int(s) for s in cfg["input_size"])
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"data_config['input_size'] must be (channels, height, width), got {cfg['input_size']!r}.")
    out = {
        "input_size": size,
        "interpolation": cfg.get("interpolation", "bilinear"),
        "mean": tuple(cfg.get("mean", (0.0,) * size[0])),
        "std": tuple(cfg.get("std", (1.0,) * size[0])),
        "crop_pct": cfg.get("crop_pct", 1.0),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    if out["interpolation"] not in _INTERPOLATION:
        raise ValueError(f"Unsupported interpolation {out['interpolation']!r}; use one of {sorted(_INTERPOLATION)}.")
    if len(out["mean"]) != size[0] or len(out["std"]) != size[0]:
        raise ValueError("data_config 'mean' and 'std' need one value per input channel.")
    return out


def preprocess_batch(t: torch.Tensor, cfg: dict, *, is_uint8: bool, resize: bool, dtype: torch.dtype) -> torch.Tensor:
    """Channels-first batch ``t`` (uint8 0..255 or float 0..1) to the model's normalised input.

    Resizing runs before grey images are repeated to the model's channel count
    (a third of the work for grey inputs), and the uint8 scaling and the
    normalisation are folded into one multiply-add.
    """
    c, th, tw = cfg["input_size"]
    t = t.to(torch.float32)
    if resize:
        t = _resize_crop(t, (th, tw), cfg, clamp_max=255.0 if is_uint8 else None)
    scale = 255.0 if is_uint8 else 1.0
    std = torch.tensor(cfg["std"], device=t.device, dtype=torch.float32).view(1, c, 1, 1)
    mean = torch.tensor(cfg["mean"], device=t.device, dtype=torch.float32).view(1, c, 1, 1)
    if t.shape[1] == 1 and c != 1:
        t = t.expand(-1, c, -1, -1)
    return torch.addcmul(-mean / std, t, 1.0 / (scale * std)).to(dtype)


def _resize_crop(t, target, cfg, clamp_max):
    """Resize then centre-crop ``t`` (N, C, H, W) like timm's eval transform."""
    _, _, h, w = t.shape
    th, tw = target
    crop_pct = cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    # the epsilon keeps crop/resize ratios such as 224 / 232 from flooring to 231
    sh, sw = math.floor(th / crop_pct + 1e-6), math.floor(tw / crop_pct + 1e-6)
    if mode == "squash":
        size = (sh, sw)
    elif mode == "border":
        ratio = max(h / sh, w / sw)
        size = (round(h / ratio), round(w / ratio))
    elif sh == sw:
        # shorter edge to the scale size, as torchvision's Resize(int) does
        size = (sh, int(sh * w / h)) if h <= w else (int(sh * h / w), sh)
    else:
        ratio = min(h / sh, w / sw)
        size = (round(h / ratio), round(w / ratio))
    if size != (h, w):
        interp = _INTERPOLATION[cfg.get("interpolation", "bilinear")]
        kwargs = {"antialias": True, "align_corners": False} if interp in ("bilinear", "bicubic") else {}
        t = F.interpolate(t, size=size, mode=interp, **kwargs)
        if clamp_max is not None:
            t = t.clamp_(0.0, clamp_max)
    nh, nw = size
    if nh < th or nw < tw:
        # pad with the mean colour, which normalises to zero
        mean = torch.tensor(cfg["mean"], device=t.device, dtype=t.dtype).view(1, -1, 1, 1) * (clamp_max or 1.0)
        if t.shape[1] == 1 and mean.shape[1] != 1:
            t = t.expand(-1, mean.shape[1], -1, -1)
        canvas = mean.expand(t.shape[0], t.shape[1], max(nh, th), max(nw, tw)).clone()
        top, left = (canvas.shape[2] - nh) // 2, (canvas.shape[3] - nw) // 2
        canvas[:, :, top : top + nh, left : left + nw] = t
        t, nh, nw = canvas, canvas.shape[2], canvas.shape[3]
    top = round((nh - th) / 2.0)
    left = round((nw - tw) / 2.0)
    return t[:, :, top : top + th, left : left + tw]
