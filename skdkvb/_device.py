"""Device resolution shared by the estimator and the encoders.

Kept in one place so that ``device="auto"`` means the same thing everywhere and
so that error messages for an unavailable device are uniform.
"""

from __future__ import annotations

import torch

_VALID = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or str or torch.device
        ``"auto"`` picks CUDA when it is available and the CPU otherwise.
        Any string torch understands (``"cuda:1"``) is accepted as well.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device torch knows, or CUDA is requested on a
        machine without it.

    Examples
    --------
    >>> from skdkvb._device import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not a valid device; use one of {_VALID} "
                "or a torch device string such as 'cuda:0'."
            ) from exc
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={device!r} is not supported: skdkvb runs on 'cpu' and 'cuda' devices "
            "(e.g. 'cuda:0'), or 'auto' to pick CUDA when available."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available on this machine; use device='auto' or 'cpu'."
        )
    return dev
