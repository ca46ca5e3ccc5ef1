"""Optional unsupervised input transform fitted together with the keys.

PCA-whitening followed by L2 normalisation puts every direction of the input
on the same scale before the random projections, so that no head's keys are
spent on a few high-variance directions. It is fitted on the same (unlabeled)
data as the keys and frozen with them, so it never breaks class-incrementality.
"""

from __future__ import annotations

import torch


class InputTransform:
    """PCA-whitening + L2 normalisation as batched torch ops.

    Parameters
    ----------
    method : {"pca-whiten"}
    n_components : int
        Components kept (capped at the input dimension, at ``n_samples - 1`` and at
        the rank of the covariance: null directions are never whitened).
    eps : float, default=1e-6
        Added to the eigenvalues before whitening (guards null directions).

    Examples
    --------
    >>> import torch
    >>> from skdkvb._transform import InputTransform
    >>> X = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    >>> t = InputTransform("pca-whiten", 4).fit(X)
    >>> t.transform(X).shape
    torch.Size([200, 4])
    """

    def __init__(self, method: str = "pca-whiten", n_components: int = 64, eps: float = 1e-6):
        if method != "pca-whiten":
            raise ValueError(f"Unknown input transform {method!r}; use 'pca-whiten'.")
        self.method = method
        self.n_components = n_components
        self.eps = eps

    def fit(self, X: torch.Tensor) -> InputTransform:
        X = X.double()
        n, d = X.shape
        # Centred data has rank <= n - 1: more components would whiten pure
        # rounding noise up by 1/sqrt(eps).
        k = max(1, min(self.n_components, d, n - 1))
        self.mean_ = X.mean(0)
        Xc = X - self.mean_
        cov = Xc.T @ Xc / max(n - 1, 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        order = torch.argsort(eigval, descending=True)[:k]
        # Also drop numerically null directions (a rank-deficient covariance).
        top = eigval[order[0]].clamp_min(0)
        kept = eigval[order] > 1e-10 * top
        k = max(1, int(kept.sum()))
        order = order[:k]
        vec = eigvec[:, order]
        # Fix the sign of each component so the transform is reproducible.
        signs = torch.sign(vec[vec.abs().argmax(0), torch.arange(k, device=vec.device)])
        vec = vec * signs.where(signs != 0, torch.ones_like(signs))
        self.components_ = (vec / (eigval[order].clamp_min(0) + self.eps).sqrt()).float()
        self.mean_ = self.mean_.float()
        self.n_features_out_ = k
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        # (X - mean) @ W written as X @ W - mean @ W so that a sparse X is
        # never densified.
        Z = X @ self.components_ - self.mean_ @ self.components_
        return Z / Z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def __getstate__(self):
        # numpy arrays, so that pickle and skops.io both store plain data.
        state = dict(self.__dict__)
        for name in ("mean_", "components_"):
            if name in state:
                state[name] = state[name].detach().cpu().numpy().copy()
        return state

    def __setstate__(self, state):
        for name in ("mean_", "components_"):
            if name in state:
                state[name] = torch.as_tensor(state[name])
        self.__dict__.update(state)

    def to(self, device, copy: bool = False) -> InputTransform:
        out = InputTransform(self.method, self.n_components, self.eps) if copy else self
        for name in ("mean_", "components_"):
            setattr(out, name, getattr(self, name).to(device))
        out.n_features_out_ = self.n_features_out_
        return out
