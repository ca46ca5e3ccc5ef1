"""A persistent on-disk embedding cache: resumable memmaps keyed by input and encoder, bounded by LRU eviction."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["EmbeddingCache", "default_cache_dir", "encoder_fingerprint"]

_DEFAULT_MAX_BYTES = 2 * 1024**3


def default_cache_dir() -> Path:
    """The default embedding cache folder.

    Returns
    -------
    pathlib.Path
        ``$SKDKVB_EMBEDDING_CACHE`` if set, else ``~/.cache/skdkvb/embeddings``.
    """
    env = os.environ.get("SKDKVB_EMBEDDING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "skdkvb" / "embeddings"


def encoder_fingerprint(encoder) -> str:
    """Hex digest of what determines an encoder's output: weights, preprocessing and input size.

    Parameters
    ----------
    encoder : FrozenEncoder
        The encoder; its module's state dict (every tensor's bytes), its data
        config and its ``preprocess`` flag are hashed.

    Returns
    -------
    str
        A 32-character hex digest.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(
        json.dumps([encoder.data_config, encoder.preprocess, repr(encoder.spec)], sort_keys=True, default=str).encode()
    )
    model = encoder.model
    if isinstance(model, torch.nn.Module):
        for name, tensor in model.state_dict().items():
            h.update(name.encode())
            t = tensor.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(model).encode())
    return h.hexdigest()


def _array_digest(X: np.ndarray) -> str:
    X = np.ascontiguousarray(X)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{X.dtype.str}{X.shape}".encode())
    h.update(memoryview(X.reshape(-1).view(np.uint8)))
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings stored once on disk and reused: keyed, resumable, bounded.

    Each entry is a folder named after a hash of the inputs and of the
    encoder (:func:`encoder_fingerprint`), holding ``embeddings.npy`` (a
    memmap of ``float16`` or ``float32``) and ``progress.json`` (rows done).
    Rows are written in chunks and the progress marker is replaced atomically
    after each chunk, so an interrupted run resumes where it stopped. After an
    entry is completed, the least recently used entries are deleted until the
    cache holds at most ``max_bytes``.

    Parameters
    ----------
    directory : str or path-like, default=None
        The cache folder; :func:`default_cache_dir` if None.
    max_bytes : int, default=2 GiB
        Size bound of the whole cache (the entry just written is always kept).
    dtype : {"float16", "float32"}, default="float16"
        Storage type; ``float16`` halves the disk use, and the embeddings are
        returned as ``float32`` either way.

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from skdkvb.encoders import FrozenEncoder
    >>> from skdkvb.encoders._disk_cache import EmbeddingCache
    >>> cache = EmbeddingCache(tempfile.mkdtemp(), dtype="float32")
    >>> enc = FrozenEncoder(torch.nn.Flatten(), device="cpu")
    >>> Z = cache.embed(enc, np.ones((5, 2, 3), dtype=np.float32), verbose=False)
    >>> Z.shape, cache.last_hit
    ((5, 6), False)
    >>> _ = cache.embed(enc, np.ones((5, 2, 3), dtype=np.float32), verbose=False)
    >>> cache.last_hit
    True
    """

    def __init__(self, directory=None, *, max_bytes: int = _DEFAULT_MAX_BYTES, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
        if not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}.")
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.last_hit = False

    def key(self, encoder, X: np.ndarray) -> str:
        """The entry name of ``X`` embedded by ``encoder``.

        Parameters
        ----------
        encoder : FrozenEncoder
            The encoder (see :func:`encoder_fingerprint`).
        X : ndarray
            The inputs (their bytes, dtype and shape are hashed).

        Returns
        -------
        str
            A 32-character hex digest, also the entry's folder name.
        """
        return hashlib.blake2b(
            f"{encoder_fingerprint(encoder)}:{_array_digest(X)}:{self.dtype}".encode(), digest_size=16
        ).hexdigest()

    def embed(self, encoder, X: np.ndarray, *, chunk_size: int = 512, verbose: bool = True) -> np.ndarray:
        """Embeddings of ``X`` from the cache, computing (or resuming) what is missing.

        Parameters
        ----------
        encoder : FrozenEncoder
            The encoder.
        X : ndarray
            The inputs (a batch the encoder accepts).
        chunk_size : int, default=512
            Rows embedded between two progress markers.
        verbose : bool, default=True
            tqdm progress bar over the rows still to embed.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out), float32
            The embeddings.
        """
        X = np.asarray(X)
        entry = self.directory / self.key(encoder, X)
        entry.mkdir(parents=True, exist_ok=True)
        progress_file, data_file = entry / "progress.json", entry / "embeddings.npy"
        progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"done": 0}
        n = X.shape[0]
        done = int(progress["done"]) if data_file.is_file() else 0
        self.last_hit = done >= n
        if done < n:
            mm = None
            bar = tqdm(total=n, initial=done, desc="embedding", unit="img", disable=not verbose)
            try:
                for start in range(done, n, chunk_size):
                    z = encoder.embed_numpy(X[start : start + chunk_size])
                    if mm is None:
                        shape = (n, z.shape[1])
                        mode = "r+" if data_file.is_file() and done > 0 else "w+"
                        mm = np.lib.format.open_memmap(data_file, mode=mode, dtype=self.dtype, shape=shape)
                    mm[start : start + z.shape[0]] = z
                    mm.flush()
                    self._write_progress(progress_file, start + z.shape[0], n)
                    bar.update(z.shape[0])
            finally:
                bar.close()
                del mm
        os.utime(progress_file)  # last use, for LRU eviction
        out = np.array(np.load(data_file, mmap_mode="r"), dtype=np.float32)
        self._evict(keep=entry)
        return out

    @staticmethod
    def _write_progress(path: Path, done: int, n: int) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": done, "n": n, "time": time.time()}))
        os.replace(tmp, path)

    def _evict(self, keep: Path) -> None:
        entries = []
        for d in self.directory.iterdir():
            if d.is_dir():
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                marker = d / "progress.json"
                used = marker.stat().st_mtime if marker.is_file() else 0.0
                entries.append((used, size, d))
        total = sum(size for _, size, _ in entries)
        for _, size, d in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)
                total -= size
