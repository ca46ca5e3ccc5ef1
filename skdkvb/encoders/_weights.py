"""Model weights from local files only: checkpoints, foreign state dicts and already-cached hub weights.

Nothing here opens a network connection or changes another library's
process-wide settings. A timm or torchvision model is built with random
weights and filled from a local file; a state dict whose key names differ from
the model's (weights ported from another implementation) is mapped onto it by
order, with every shape checked, by :func:`load_foreign_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadReport", "convert_checkpoint", "load_foreign_state_dict", "read_state_dict"]

# Nesting keys that training scripts put around the state dict itself.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")


@dataclass
class LoadReport:
    """What a checked state-dict load did.

    Parameters
    ----------
    mode : {"name", "order"}
        ``"name"``: tensors were matched by key; ``"order"``: by position, with
        every shape checked.
    mapped : list of tuple
        ``(source_key, target_key, shape)`` for every tensor loaded.
    missing : list of str
        Target keys left as they were (only classifier-head keys are allowed).
    skipped : list of str
        Source keys not used (only classifier-head keys are allowed).
    """

    mode: str
    mapped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def n_renamed(self) -> int:
        """Number of tensors whose source and target key names differ."""
        return sum(src != dst for src, dst, _ in self.mapped)

    def __str__(self) -> str:
        text = f"loaded {len(self.mapped)} tensors by {self.mode} ({self.n_renamed} renamed)"
        if self.missing:
            text += f", {len(self.missing)} head tensors left out: {self.missing}"
        if self.skipped:
            text += f", {len(self.skipped)} source tensors unused: {self.skipped}"
        return text


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local ``.safetensors`` file or a torch state dict (never unpickles code).

    Parameters
    ----------
    path : str or path-like
        The file. Torch files are read with ``weights_only=True``; a state dict
        nested under ``"state_dict"``, ``"model"`` or similar keys is unwrapped,
        and a ``"module."`` prefix (from ``DataParallel``) is removed.

    Returns
    -------
    dict of str to torch.Tensor
        The tensors, on the CPU, in the file's order.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from skdkvb.encoders import read_state_dict
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
    >>> torch.save({"state_dict": {"module.w": torch.ones(2)}}, path)
    >>> list(read_state_dict(path))
    ['w']
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint_path={str(path)!r} does not exist or is not a file. Pass the path of a "
            "'.safetensors' file or of a torch state dict ('.pth', '.pt', '.bin')."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise ValueError(
            f"Could not read checkpoint_path={str(path)!r} as safetensors or a torch state dict: {exc}"
        ) from exc
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint_path={str(path)!r} does not hold a state dict (a mapping of names to tensors).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _is_head(key: str, head_prefixes: tuple[str, ...]) -> bool:
    return bool(head_prefixes) and key.startswith(head_prefixes)


def load_foreign_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    head_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state`` into ``model``, by key names when they match, else by order and shape.

    Weights ported from another implementation keep the architecture's tensor
    order but not its names. When the names do not match, the i-th source
    tensor goes to the i-th target tensor, and the load is refused unless both
    have the same number of tensors and every pair has the same shape. The
    model is left untouched when the load is refused.

    Parameters
    ----------
    model : torch.nn.Module
        The target; its ``state_dict()`` order is the reference.
    state : mapping of str to torch.Tensor
        The source tensors, in their saved order.
    head_prefixes : tuple of str, default=()
        Key prefixes of the model's classifier head. When loading by name,
        head tensors may be missing from ``state`` (a headless checkpoint) or
        unused (a head for another number of classes).

    Returns
    -------
    LoadReport
        How tensors were matched, and what was left out.

    Raises
    ------
    ValueError
        When the tensors cannot be matched: different counts, or any shape
        differs; the message names the first mismatch.

    Examples
    --------
    >>> import torch
    >>> from skdkvb.encoders import load_foreign_state_dict
    >>> target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    >>> source = {"a.w": torch.ones(2, 3), "a.b": torch.ones(2), "b.w": torch.ones(1, 2), "b.b": torch.ones(1)}
    >>> report = load_foreign_state_dict(target, source)
    >>> report.mode, report.n_renamed
    ('order', 4)
    >>> float(target[1].bias)
    1.0
    """
    target = model.state_dict()
    head_prefixes = tuple(head_prefixes)
    src_body = [k for k in state if not _is_head(k, head_prefixes)]
    tgt_body = [k for k in target if not _is_head(k, head_prefixes)]
    if set(src_body) == set(tgt_body):
        mapped, new = [], {}
        for key in state:
            if key in target:
                if _is_head(key, head_prefixes) and tuple(state[key].shape) != tuple(target[key].shape):
                    continue  # another number of classes: the head is not used
                if tuple(state[key].shape) != tuple(target[key].shape):
                    raise ValueError(
                        f"Tensor {key!r} has shape {tuple(state[key].shape)} in the checkpoint but "
                        f"{tuple(target[key].shape)} in the model. Was it saved from another architecture "
                        "or another number of classes?"
                    )
                new[key] = state[key]
                mapped.append((key, key, tuple(state[key].shape)))
        missing = [k for k in target if k not in new]
        skipped = [k for k in state if k not in new]
        model.load_state_dict(new, strict=False)
        return LoadReport("name", mapped, missing, skipped)
    src, tgt = list(state), list(target)
    if len(src) != len(tgt):
        only_src = [k for k in src_body if k not in target][:3]
        only_tgt = [k for k in tgt_body if k not in state][:3]
        raise ValueError(
            f"The checkpoint's key names differ from the model's (e.g. {only_src} vs {only_tgt}) and it holds "
            f"{len(src)} tensors against the model's {len(tgt)}, so they cannot be matched by order either. "
            "Is it the same architecture (and the same classifier head)?"
        )
    mapped = []
    for i, (s, t) in enumerate(zip(src, tgt)):
        s_shape, t_shape = tuple(state[s].shape), tuple(target[t].shape)
        if s_shape != t_shape:
            raise ValueError(
                f"Tensor #{i} does not fit: checkpoint {s!r} has shape {s_shape}, model {t!r} has {t_shape}. "
                "The checkpoint is not this architecture in the same order; nothing was loaded."
            )
        mapped.append((s, t, s_shape))
    model.load_state_dict({t: state[s] for s, t, _ in mapped}, strict=True)
    return LoadReport("order", mapped)


def convert_checkpoint(
    source: str | os.PathLike,
    encoder: str,
    destination: str | os.PathLike,
) -> LoadReport:
    """Turn a weights file with foreign key names into a checkpoint for ``encoder``.

    The model is built with its classifier head, ``source`` is loaded into it
    with :func:`load_foreign_state_dict`, and the model's own state dict is
    saved to ``destination`` (``.safetensors`` or a torch file), ready for
    ``checkpoint_path``.

    Parameters
    ----------
    source : str or path-like
        The foreign weights file (e.g. ``efficientnet-lite0-57934424.pth``).
    encoder : str
        A timm model name or ``"torchvision:<name>"``.
    destination : str or path-like
        Where to write the converted checkpoint.

    Returns
    -------
    LoadReport
        How the tensors were matched.

    Examples
    --------
    >>> import os, tempfile, timm, torch
    >>> from skdkvb.encoders import convert_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> state = timm.create_model("test_vit", pretrained=False).state_dict()
    >>> renamed = {f"p{i}": v for i, v in enumerate(state.values())}
    >>> torch.save(renamed, os.path.join(folder, "foreign.pth"))
    >>> report = convert_checkpoint(
    ...     os.path.join(folder, "foreign.pth"), "test_vit", os.path.join(folder, "vit.safetensors")
    ... )
    >>> report.mode
    'order'
    """
    from ._frozen import _create_model, _head_prefixes

    model = _create_model(encoder, {}, with_head=True)
    report = load_foreign_state_dict(model, read_state_dict(source), head_prefixes=_head_prefixes(model))
    destination = os.fspath(destination)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if destination.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, destination)
    else:
        torch.save(state, destination)
    return report


def cached_hub_file(cfg: Mapping[str, Any]) -> str | None:
    """Path of a timm model's pretrained weights if they are already in a local cache, else None.

    Looks in the Hugging Face cache (``huggingface_hub.try_to_load_from_cache``)
    and in torch hub's ``checkpoints`` folder; never opens a connection.
    """
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(repo).partition("@")
        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            if filename:
                path = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(path, str) and os.path.isfile(path):
                    return path
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url).split("?")[0])
        if path.is_file():
            return str(path)
    file = cfg.get("file")
    if file and Path(file).is_file():
        return str(file)
    return None
