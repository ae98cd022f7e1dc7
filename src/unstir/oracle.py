"""The Gaussian-mixture oracle: data whose noised marginals, score, eps and x0 are exact.

If p_0 = sum_k w_k N(mu_k, Sigma_k), then under any process
p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I), so

    score(x, t) = sum_k r_k(x) C_k^{-1} (alpha mu_k - x),    C_k = alpha^2 Sigma_k + sigma^2 I,
    r_k(x)      = p(k | x_t) = w_k N(x; alpha mu_k, C_k) / p_t(x),

and eps = -sigma score, x0 = E[x0 | x_t] = (x - sigma eps)/alpha (Tweedie). Each Sigma_k is
diagonalised once (Sigma_k = U_k diag(l_k) U_k^T), so C_k = U_k diag(alpha^2 l_k + sigma^2) U_k^T costs
nothing per call, even with a different t for every sample. All arithmetic is float64.

A mixture is used like a trained network: ``mixture.denoiser(process)`` returns the same wrapper.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_time, expand_as
from .parametrization import Denoiser
from .processes import Process

Tensor = torch.Tensor
_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in R^d. ``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d),
    or (K, d) for diagonal covariances, or a scalar / (K,) for isotropic ones."""

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(mu.shape)}")
        K, d = mu.shape
        if w.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means {tuple(mu.shape)}, got {tuple(w.shape)}")
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if cov.ndim == 0 or cov.shape == (K,):
            cov = cov.reshape(-1, 1, 1) * torch.eye(d, dtype=torch.float64).expand(K, d, d)
        elif cov.shape == (K, d):
            cov = torch.diag_embed(cov)
        if cov.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), ({K}, {d}), ({K},) or be a scalar; "
                             f"got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(1, 2), rtol=1e-10, atol=1e-12):
            raise ValueError("covs must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if not (evals > 0).all():
            k = int((evals <= 0).any(1).nonzero()[0])
            raise ValueError(f"covariance {k} is not positive definite: smallest eigenvalue {evals[k].min().item():.3g}")
        self.weights = w / w.sum()
        self.means, self.covs = mu, cov
        self._evals, self._evecs = evals, evecs
        self._chol = torch.linalg.cholesky(cov)

    def to(self, device) -> "GaussianMixture":
        """The same mixture with its tensors on ``device`` (its scores then follow x there)."""
        moved = object.__new__(GaussianMixture)
        moved.__dict__ = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return moved

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim})"

    # data ------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False):
        """n exact samples of p_0 (float64, on the mixture's device), optionally with their component labels;
        drawn on the CPU generator, so the same on every device."""
        labels = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(self.means.device)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64).to(self.means.device)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self._chol[labels], z)
        return (x, labels) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x)."""
        return self._terms(x, None, None)[0]

    def condition(self, observed: Tensor, values: Tensor) -> "GaussianMixture":
        """The mixture of the unobserved coordinates given x[observed] = values (for inpainting checks).

        ``observed`` is a boolean mask of shape (d,) and ``values`` the observed coordinates."""
        m = torch.as_tensor(observed, dtype=torch.bool)
        if m.shape != (self.dim,) or m.all() or not m.any():
            raise ValueError(f"observed must be a boolean mask of shape ({self.dim},) with some but not all True")
        v = torch.as_tensor(values, dtype=torch.float64)
        if v.shape != (int(m.sum()),):
            raise ValueError(f"values must have shape ({int(m.sum())},), got {tuple(v.shape)}")
        o, u = m, ~m
        S_oo = self.covs[:, o][:, :, o]
        S_uo = self.covs[:, u][:, :, o]
        S_uu = self.covs[:, u][:, :, u]
        diff = v - self.means[:, o]
        gain = torch.linalg.solve(S_oo, S_uo.transpose(1, 2)).transpose(1, 2)  # S_uo S_oo^{-1}
        means = self.means[:, u] + torch.einsum("kij,kj->ki", gain, diff)
        covs = S_uu - gain @ S_uo.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        logw = torch.log(self.weights) + _log_normal(v[None], self.means[:, o], S_oo)[0]
        return GaussianMixture(torch.softmax(logw, 0), means, covs)

    def posterior_given(self, A, y, sigma_y) -> "GaussianMixture":
        """The posterior p(x0 | y) for linear measurements y = A x0 + n, n ~ N(0, Sigma_y): again a Gaussian
        mixture (Bayes' rule per component),

            Sigma'_k = (Sigma_k^-1 + A^T Sigma_y^-1 A)^-1,   mu'_k = Sigma'_k (A^T Sigma_y^-1 y + Sigma_k^-1 mu_k),
            w'_k ~ w_k N(y; A mu_k, A Sigma_k A^T + Sigma_y).

        ``A`` is (m, d); ``y`` (m,); ``sigma_y`` a scalar standard deviation (> 0), a (m,) vector of them, or
        an (m, m) covariance. Noiseless observation of coordinates is ``condition``."""
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"A must have shape (m, {self.dim}), got {tuple(A.shape)}")
        m = A.shape[0]
        if y.shape != (m,):
            raise ValueError(f"y must have shape ({m},) to match A {tuple(A.shape)}, got {tuple(y.shape)}")
        S_y = torch.as_tensor(sigma_y, dtype=torch.float64)
        if S_y.ndim == 0 or S_y.shape == (m,):
            if not (S_y > 0).all():
                raise ValueError(f"sigma_y must be positive here (use condition() for noiseless data), got {S_y.tolist()}")
            S_y = torch.diag_embed(S_y.expand(m) ** 2)
        if S_y.shape != (m, m):
            raise ValueError(f"sigma_y must be a scalar, ({m},) or ({m}, {m}), got {tuple(S_y.shape)}")
        prec = torch.linalg.inv(self.covs) + (A.T @ torch.linalg.solve(S_y, A))
        covs = torch.linalg.inv(prec)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        rhs = (A.T @ torch.linalg.solve(S_y, y)) + torch.linalg.solve(self.covs, self.means[..., None])[..., 0]
        means = torch.einsum("kij,kj->ki", covs, rhs)
        pred_cov = A @ self.covs @ A.T + S_y
        logw = torch.log(self.weights) + _log_normal(y[None], self.means @ A.T, pred_cov)[0]
        return GaussianMixture(torch.softmax(logw, 0), means, covs)

    def subset(self, components) -> "GaussianMixture":
        """The mixture of the given components, their weights renormalised (a class of the data)."""
        idx = torch.as_tensor(components, dtype=torch.long)
        return GaussianMixture(self.weights[idx], self.means[idx], self.covs[idx])

    def _classes(self, classes) -> Tensor:
        classes = torch.arange(self.n_components) if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (self.n_components,) or classes.min() < 0:
            raise ValueError(f"classes must give a class id >= 0 for each of the {self.n_components} components, "
                             f"got {classes.tolist()}")
        return classes

    def classifier(self, process: Process, classes=None) -> "ExactClassifier":
        """The exact noise-conditional classifier log p_t(y | x) when class ``classes[k]`` owns component k
        (default: one class per component): the log of the summed responsibilities of the class's components."""
        return ExactClassifier(self, process, self._classes(classes))

    def class_conditional_denoiser(self, process: Process, classes=None) -> Denoiser:
        """The exact class-conditional model: with labels y, eps of the class's own mixture (``subset``);
        without, eps of the whole mixture. ``num_classes`` is the number of classes."""
        classes = self._classes(classes)
        n = int(classes.max()) + 1
        parts = [self.subset((classes == c).nonzero()[:, 0]) for c in range(n)]

        def net(x, t, y=None):
            if y is None:
                return self.eps(x, t, process)
            out = torch.empty_like(x)
            for c, part in enumerate(parts):
                m = y == c
                if m.any():
                    out[m] = part.eps(x[m], t[m], process)
            return out

        net.device = self.means.device
        return Denoiser(net, process, "eps", time_dtype=torch.float64, data_shape=(self.dim,), num_classes=n)

    # noised marginals ------------------------------------------------------------------------
    def _terms(self, x: Tensor, t, process: Process | None, log_resp: bool = False):
        """(log p_t(x), responsibilities r (B, K) (or their logs), score (B, d)) in float64."""
        x = torch.as_tensor(x).to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        if process is None:
            a = torch.ones((), dtype=torch.float64, device=x.device)
            s2 = torch.zeros((), dtype=torch.float64, device=x.device)
        else:
            tt = as_time(t, process.t_min, process.T, x.shape[0]).to(x.device)
            a, s2 = process.alpha(tt), process.sigma(tt) ** 2
        a, s2 = a.reshape(-1, 1, 1), s2.reshape(-1, 1, 1)  # (B or 1, 1, 1)
        var = a**2 * self._evals + s2  # (B|1, K, d)
        diff = x[:, None, :] - a * self.means  # (B, K, d)
        z = torch.einsum("bkd,kde->bke", diff, self._evecs)
        logn = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * _LOG_2PI)
        logjoint = torch.log(self.weights) + logn
        logp = torch.logsumexp(logjoint, -1)
        if log_resp:
            return logp, logjoint - logp[:, None], None
        r = torch.softmax(logjoint, -1)
        score = -torch.einsum("bk,bke,kde->bd", r, z / var, self._evecs)
        return logp, r, score

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def marginal_log_prob(self, x: Tensor, t, process: Process) -> Tensor:
        """log p_t(x) under ``process``."""
        return self._terms(self._flat(x), t, process)[0]

    def posterior(self, x: Tensor, t=None, process: Process | None = None) -> Tensor:
        """p(k | x_t), shape (batch, K): an exact classifier of the noised data (of the data itself
        when t and process are omitted)."""
        return self._terms(self._flat(x), t, process)[1]

    def score(self, x: Tensor, t, process: Process) -> Tensor:
        """grad_x log p_t(x), in x's dtype and shape."""
        return self._terms(self._flat(x), t, process)[2].to(x.dtype).reshape(x.shape)

    def eps(self, x: Tensor, t, process: Process) -> Tensor:
        """E[eps | x_t] = -sigma(t) score."""
        tt = as_time(t, process.t_min, process.T, x.shape[0])
        score = self._terms(self._flat(x), tt, process)[2]
        return (-expand_as(process.sigma(tt), score) * score).to(x.dtype).reshape(x.shape)

    def x0(self, x: Tensor, t, process: Process) -> Tensor:
        """E[x0 | x_t] = (x + sigma^2 score) / alpha."""
        tt = as_time(t, process.t_min, process.T, x.shape[0])
        xf = self._flat(x).to(torch.float64)
        score = self._terms(xf, tt, process)[2]
        a, s = expand_as(process.alpha(tt), xf), expand_as(process.sigma(tt), xf)
        return ((xf + s**2 * score) / a).to(x.dtype).reshape(x.shape)

    def denoiser(self, process: Process) -> Denoiser:
        """The exact model of this data under ``process``, as the same wrapper a network gets."""
        def net(x, t):
            return self.eps(x, t, process)

        net.device = self.means.device  # where unstir.sample draws a prior given by its shape (model_device)
        return Denoiser(net, process, "eps", time_dtype=torch.float64, data_shape=(self.dim,))


class LowRankMixture(GaussianMixture):
    """sum_k w_k N(mu_k, diag(D_k) + U_k U_k^T) in d dimensions with rank-r factors U_k (d, r): the oracle at
    image dimension (d = 3072 for 3x32x32), where a dense d x d covariance per component would cost 75 MB and
    its eigendecomposition minutes.

    Under a process the component's covariance is C_k = Lam_k + V_k V_k^T with Lam_k = diag(alpha^2 D_k + sigma^2)
    and V_k = alpha U_k, so by the Woodbury identity and the matrix determinant lemma, with
    M_k = I_r + V_k^T Lam_k^-1 V_k (r x r) and w = V_k^T Lam_k^-1 (x - alpha mu_k):

        C_k^-1 (x - alpha mu_k) = Lam_k^-1 (x - alpha mu_k) - Lam_k^-1 V_k M_k^-1 w,
        (x - alpha mu_k)^T C_k^-1 (x - alpha mu_k) = sum (x - alpha mu_k)^2 / Lam_k - w^T M_k^-1 w,
        log det C_k = sum log Lam_k + log det M_k,

    which is O(d r^2) per component and time. Everything a ``GaussianMixture`` offers through its marginals
    (score, eps, x0, posterior, marginal_log_prob, log_prob, denoiser, sample) works unchanged; the exact
    conditionings (``condition``, ``posterior_given``) are for the dense mixture. ``data_shape`` (default (d,))
    is the per-sample shape the denoiser declares and ``sample`` returns, e.g. (3, 32, 32)."""

    def __init__(self, weights, means, diag, factors, data_shape=None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        D = torch.as_tensor(diag, dtype=torch.float64)
        U = torch.as_tensor(factors, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(mu.shape)}")
        K, d = mu.shape
        if w.shape != (K,) or not (torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"weights must be {K} positive finite numbers, got shape {tuple(w.shape)}")
        if D.shape != (K, d) or not (torch.isfinite(D).all() and (D > 0).all()):
            raise ValueError(f"diag must have shape ({K}, {d}) with positive entries, got shape {tuple(D.shape)}")
        if U.ndim != 3 or U.shape[:2] != (K, d) or not torch.isfinite(U).all():
            raise ValueError(f"factors must have shape ({K}, {d}, r) and be finite, got {tuple(U.shape)}")
        shape = (d,) if data_shape is None else tuple(int(v) for v in data_shape)
        if math.prod(shape) != d:
            raise ValueError(f"data_shape {shape} holds {math.prod(shape)} values, the means {d}")
        self.weights, self.means, self.diag, self.factors, self.data_shape = w / w.sum(), mu, D, U, shape

    @property
    def covs(self):
        raise AttributeError("a LowRankMixture keeps diag + factors, not dense covariances (d x d each); use "
                             "dense_covs() for small d")

    def dense_covs(self) -> Tensor:
        """diag(D_k) + U_k U_k^T as (K, d, d): for checks at small d."""
        return torch.diag_embed(self.diag) + self.factors @ self.factors.transpose(1, 2)

    def to(self, device) -> "LowRankMixture":
        return LowRankMixture(self.weights.to(device), self.means.to(device), self.diag.to(device),
                              self.factors.to(device), self.data_shape)

    def __repr__(self) -> str:
        return f"LowRankMixture(K={self.n_components}, d={self.dim}, rank={self.factors.shape[2]})"

    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False):
        """n samples of shape (n, *data_shape): mu_k + sqrt(D_k) z1 + U_k z2."""
        labels = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z1 = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        z2 = torch.randn(n, self.factors.shape[2], generator=generator, dtype=torch.float64)
        dev = self.means.device
        labels, z1, z2 = labels.to(dev), z1.to(dev), z2.to(dev)
        x = self.means[labels] + self.diag[labels].sqrt() * z1 + torch.einsum("bdr,br->bd", self.factors[labels], z2)
        x = x.reshape(n, *self.data_shape)
        return (x, labels) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        return self._terms(self._flat(x), None, None)[0]

    def condition(self, observed, values):
        raise NotImplementedError("condition() is exact for the dense GaussianMixture; a LowRankMixture does not "
                                  "offer it (its conditionals are low-rank too, but not built here)")

    def posterior_given(self, A, y, sigma_y):
        raise NotImplementedError("posterior_given() is exact for the dense GaussianMixture only")

    def subset(self, components) -> "LowRankMixture":
        idx = torch.as_tensor(components, dtype=torch.long)
        return LowRankMixture(self.weights[idx], self.means[idx], self.diag[idx], self.factors[idx], self.data_shape)

    def _terms(self, x: Tensor, t, process: Process | None, log_resp: bool = False):
        x = torch.as_tensor(x).to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        if process is None:
            a = torch.ones(1, dtype=torch.float64, device=x.device)
            s2 = torch.zeros(1, dtype=torch.float64, device=x.device)
        else:
            tt = as_time(t, process.t_min, process.T, x.shape[0]).to(x.device).reshape(-1)
            a, s2 = process.alpha(tt).reshape(-1), (process.sigma(tt) ** 2).reshape(-1)
            if torch.all(tt == tt[0]):  # one time for the batch (every sampler step): the r x r work once
                a, s2 = a[:1], s2[:1]
        a3, s3 = a.reshape(-1, 1, 1), s2.reshape(-1, 1, 1)  # (B|1, 1, 1)
        lam = a3**2 * self.diag + s3  # (B|1, K, d)
        V = a.reshape(-1, 1, 1, 1) * self.factors  # (B|1, K, d, r)
        r = self.factors.shape[2]
        M = torch.eye(r, dtype=torch.float64, device=x.device) + torch.einsum("bkdr,bkd,bkds->bkrs", V, 1 / lam, V)
        L = torch.linalg.cholesky(M)
        diff = x[:, None, :] - a3 * self.means  # (B, K, d)
        u = diff / lam
        w = torch.einsum("bkdr,bkd->bkr", V, u)  # (B, K, r), V broadcast over B
        sol = torch.cholesky_solve(w.unsqueeze(-1), L.expand(x.shape[0], *L.shape[1:])).squeeze(-1)  # M^-1 w
        quad = (diff * u).sum(-1) - (w * sol).sum(-1)
        logdet = torch.log(lam).sum(-1) + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logjoint = torch.log(self.weights) + -0.5 * (quad + logdet + self.dim * _LOG_2PI)
        logp = torch.logsumexp(logjoint, -1)
        if log_resp:
            return logp, logjoint - logp[:, None], None
        resp = torch.softmax(logjoint, -1)
        cinv_diff = u - torch.einsum("bkdr,bkr->bkd", V, sol) / lam  # C^-1 (x - alpha mu), (B, K, d)
        return logp, resp, -torch.einsum("bk,bkd->bd", resp, cinv_diff)

    def denoiser(self, process: Process) -> Denoiser:
        """The exact model under ``process``, declaring ``data_shape``."""
        def net(x, t):
            return self.eps(x, t, process)

        net.device = self.means.device
        return Denoiser(net, process, "eps", time_dtype=torch.float64, data_shape=self.data_shape)


def image_mixture(shape=(3, 32, 32), n_components: int = 4, rank: int = 8, *, seed: int = 0) -> LowRankMixture:
    """A reproducible image-sized ``LowRankMixture``: each component's mean a smooth colour pattern (a product of
    low-frequency waves per channel, RMS 0.5 per pixel), varying along ``rank`` smooth patterns (RMS 0.15 per
    pixel each) and by 0.05 per pixel independently: most variance in a few smooth directions, as in natural
    images, with an exact score."""
    c, h, w = shape if len(shape) == 3 else (1, 1, math.prod(shape))
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64), torch.linspace(0, 1, w, dtype=torch.float64),
                            indexing="ij")

    def smooth(n):  # n random smooth patterns of the data's shape, each of unit RMS per pixel
        f = torch.randint(1, 4, (n, c, 2, 2), generator=g).double()
        ph = 2 * math.pi * torch.rand(n, c, 2, generator=g, dtype=torch.float64)
        p = (torch.sin(math.pi * f[..., 0, 0, None, None] * xx + ph[..., 0, None, None])
             * torch.cos(math.pi * f[..., 1, 1, None, None] * yy + ph[..., 1, None, None]))
        return (p / p.pow(2).mean((1, 2, 3), keepdim=True).sqrt()).reshape(n, -1)

    d = c * h * w
    means = 0.5 * smooth(n_components)
    factors = 0.15 * smooth(n_components * rank).reshape(n_components, rank, d).transpose(1, 2)
    diag = torch.full((n_components, d), 0.05**2, dtype=torch.float64)
    weights = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.5
    return LowRankMixture(weights, means, diag, factors, tuple(shape))


class ExactClassifier:
    """log p_t(class | x) of a Gaussian mixture whose classes own sets of components: a noise-conditional
    classifier with the ``(x, t) -> log-probabilities (batch, classes)`` call of a trained one."""

    def __init__(self, mixture: GaussianMixture, process: Process, classes: Tensor):
        self.mixture, self.process, self.classes = mixture, process, classes
        self.num_classes = int(classes.max()) + 1

    def __call__(self, x: Tensor, t) -> Tensor:
        logr = self.mixture._terms(self.mixture._flat(x), t, self.process, log_resp=True)[1]
        onehot = torch.nn.functional.one_hot(self.classes, self.num_classes).to(logr)
        return torch.logsumexp(logr[:, :, None] + torch.log(onehot)[None], 1).to(x.dtype)


def _log_normal(x: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """log N(x_b; mu_k, S_k), shape (B, K)."""
    L = torch.linalg.cholesky(covs)
    diff = (x[:, None, :] - means).unsqueeze(-1)  # (B, K, d, 1)
    sol = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * ((sol**2).sum(-1) + logdet + means.shape[1] * _LOG_2PI)


# --- ready-made examples ------------------------------------------------------------------------


def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.05) -> GaussianMixture:
    """n_modes sharp isotropic modes, equally weighted, evenly spaced on a circle in 2-D."""
    angle = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return GaussianMixture(torch.ones(n_modes), means, torch.full((n_modes,), std**2, dtype=torch.float64))


def unequal_2d() -> GaussianMixture:
    """Three 2-D modes with weights 0.6/0.3/0.1 and correlated, anisotropic covariances."""
    means = [[-1.0, -0.5], [1.2, 0.8], [0.0, 1.6]]
    covs = [[[0.15, 0.08], [0.08, 0.10]], [[0.05, -0.02], [-0.02, 0.08]], [[0.02, 0.0], [0.0, 0.02]]]
    return GaussianMixture([0.6, 0.3, 0.1], means, covs)


def smooth_2d() -> GaussianMixture:
    """Two broad, overlapping 2-D modes: a smooth score field, for convergence-order studies."""
    return GaussianMixture([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.2]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.25]]])


def random_mixture(dim: int = 8, n_components: int = 4, *, scale: float = 1.0, seed: int = 0) -> GaussianMixture:
    """A reproducible mixture in ``dim`` dimensions with random means and full covariances."""
    if dim < 1 or n_components < 1:
        raise ValueError(f"dim and n_components must be >= 1, got dim={dim}, n_components={n_components}")
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
    A = torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    covs = 0.1 * scale**2 * (A @ A.transpose(1, 2) + 0.2 * torch.eye(dim, dtype=torch.float64))
    weights = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(weights, means, covs)


EXAMPLES = {"ring": ring, "unequal_2d": unequal_2d, "smooth_2d": smooth_2d, "random": random_mixture}
# image_mixture (3x32x32, LowRankMixture) is not in EXAMPLES: its 3072-D samples are no 2-D scatter
