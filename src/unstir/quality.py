"""Image sample quality without downloaded weights: Frechet distance, kernel distance (KID) and precision/recall
(Kynkaanniemi et al. 2019) in the feature space of a classifier trained here, with bootstrap intervals and the
two-sample floor beside them; for
``shapes32``, validity and class coverage read by a factor classifier.

A classifier trained on the data set stands in for Inception (FID's network, Heusel et al. 2017), which would
have to be downloaded. Its numbers compare samplers and runs on one data set; they are not FID values. With
a copy of the Inception network, ``fid`` computes FID itself."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import data as data_mod

Tensor = torch.Tensor


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets
    (Heusel et al. 2017, Eq. 6), in float64. The trace of the matrix square root is the sum of the square
    roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which are real and >= 0."""
    a, b = _features(a), _features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
    around its points with radius the distance to the k-th nearest neighbour (k = 3, the paper's choice);
    precision is the share of fake points inside the real manifold, recall the share of real points inside
    the fake one."""
    real, fake = torch.as_tensor(_features(real)), torch.as_tensor(_features(fake))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k = {k} points in each set, got {len(real)} and {len(fake)}")

    def radii(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the 0 to itself comes first

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None]).any(1).double().mean().item()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x . y / d + 1)^3 (Binkowski et al. 2018, Sec. 4; the clean-fid and
    torch-fidelity default)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _kid_from_counts(kaa, kbb, kab, ca, cb) -> np.ndarray:
    """The unbiased MMD^2 of resampled sets given each original point's multiplicity (rows of ca, cb): pairs
    of copies of one point are left out of the within-set U-statistics (a bootstrap that kept them would add
    k(x, x) terms and bias KID up)."""
    def within(k, c):
        total = np.einsum("bi,ij,bj->b", c, k, c) - (c**2) @ np.diag(k)
        return total / (c.sum(1) ** 2 - (c**2).sum(1))

    return within(kaa, ca) + within(kbb, cb) - 2 * np.einsum("bi,ij,bj->b", ca, kab, cb) / (ca.sum(1) * cb.sum(1))


def kernel_distance(a: Tensor, b: Tensor) -> float:
    """Kernel Inception Distance in any feature space (KID; Binkowski et al. 2018): the unbiased estimate of
    MMD^2 with the cubic polynomial kernel, over all pairs (the reference code averages over subsets of 1000
    points; over all pairs the estimate has the same mean and less variance). Unbiased at every n, where the
    Frechet distance is biased upward at small n. Can be slightly negative when the sets match."""
    a, b = _features(a), _features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"KID needs at least 2 points in each set, got {len(a)} and {len(b)}")
    ones_a, ones_b = np.ones((1, len(a))), np.ones((1, len(b)))
    return float(_kid_from_counts(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b), ones_a, ones_b)[0])


def bootstrap(metric, a, b, *, resamples: int = 200, level: float = 0.95, seed: int = 0,
              bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float, float]:
    """(value, lo, hi): ``metric(a, b)`` and an interval at ``level`` for it, from ``resamples`` resamples drawn from
    ``seed``. ``metric`` is any two-set statistic (``frechet_distance``, ``precision_recall``'s parts, a validity
    rate as ``lambda a, b: ...``).

    * ``kernel_distance``: the percentile bootstrap (Efron & Tibshirani 1993, Ch. 13), both sets resampled with
      replacement, computed from the kernel matrices leaving out pairs of copies of one point (KID is unbiased).
    * Every other metric: half-sampling without replacement (m = n/2 of each set; the m-out-of-n subsampling of
      Politis & Romano 1994 at the m where the finite-population correction makes the half-sample's variance that
      of the full sample), the interval being the estimate plus the half-samples' quantiles about their median.
      Copies of a point, which a with-replacement bootstrap makes, give a k-NN radius of 0 and drag precision and
      recall down (measured: 23 % coverage of a nominal 90 % interval for precision at n = 150); and a statistic
      biased at its n (FD, precision, recall) is biased more at n/2, which the re-centring removes. The interval
      is for the statistic's value at this n, which is what two samplers compared at equal n share. ``bounds``
      clips the re-centred interval to the statistic's range (a rate's [0, 1], a distance's [0, inf)).

    tests/test_quality.py checks the coverage of both kinds."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 10:
        raise ValueError(f"resamples must be an integer >= 10, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    fa, fb = _features(a), _features(b)
    rng = np.random.default_rng(seed)
    value = float(metric(a, b))
    quantiles = [(1 - level) / 2, (1 + level) / 2]
    if metric is kernel_distance:
        ia = rng.integers(0, len(fa), (resamples, len(fa)))
        ib = rng.integers(0, len(fb), (resamples, len(fb)))
        count = lambda idx, n: np.stack([np.bincount(r, minlength=n) for r in idx]).astype(np.float64)  # noqa: E731
        stats = _kid_from_counts(_poly_kernel(fa, fa), _poly_kernel(fb, fb), _poly_kernel(fa, fb),
                                 count(ia, len(fa)), count(ib, len(fb)))
        lo, hi = np.quantile(stats, quantiles)
        return value, float(lo), float(hi)
    if min(len(fa), len(fb)) < 8:
        raise ValueError(f"half-sampling needs at least 8 points per set, got {len(fa)} and {len(fb)}")
    half = lambda n: rng.permutation(n)[: n // 2]  # noqa: E731
    stats = np.array([metric(torch.as_tensor(fa[half(len(fa))]), torch.as_tensor(fb[half(len(fb))]))
                      for _ in range(resamples)])
    lo, hi = np.clip(value + np.quantile(stats, quantiles) - np.median(stats), *bounds)
    return value, float(lo), float(hi)


def overlap(x: tuple, y: tuple) -> bool:
    """Whether two (value, lo, hi) intervals overlap: if they do, the two figures are not told apart at that
    level."""
    return x[1] <= y[2] and y[1] <= x[2]


def _features(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().double() if isinstance(x, Tensor) else x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (n >= 2, width), got shape {x.shape}")
    return x


INVALID = 18  # the factor classifier's class for an image that is not one shapes32 shape


class ShapesClassifier(nn.Module):
    """A small convolutional classifier of shapes32 images: 18 classes (6 shape + colour) and class 18,
    'not a shapes32 image' (trained on two shapes at once, blank images and shapes in colours outside the
    palette). ``features`` is its 128-wide penultimate layer, the space of the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 128), nn.SiLU())
        self.head = nn.Linear(128, INVALID + 1)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _negatives(n: int, rng: np.random.Generator) -> Tensor:
    """Images that are not one shapes32 shape: two shapes overlaid, blank, or one shape recoloured off the palette."""
    a, b = data_mod.shapes32(n, int(rng.integers(2**31))).x, data_mod.shapes32(n, int(rng.integers(2**31))).x
    kind = torch.as_tensor(rng.integers(0, 3, n))
    two = torch.maximum(a, b)
    blank = torch.full_like(a, -1.0)
    lit = (a > -1).any(1, keepdim=True)
    colour = torch.as_tensor(rng.uniform(-1, 1, (n, 3, 1, 1)), dtype=a.dtype)
    recoloured = torch.where(lit, -1 + (a.amax(1, keepdim=True) + 1) / 2 * (colour + 1), a)
    pick = kind[:, None, None, None]
    return torch.where(pick == 0, two, torch.where(pick == 1, blank, recoloured))


def train_shapes_classifier(steps: int = 1500, batch_size: int = 128, seed: int = 0,
                            progress: bool = False) -> ShapesClassifier:
    """The factor classifier, trained on fresh shapes32 draws (seeds disjoint from training sets and from
    shapes32-test) and on negatives (a fifth of each batch)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 77)
    net = ShapesClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), disable=not progress, desc="factor classifier", unit="step"):
        pos = data_mod.shapes32(batch_size - batch_size // 5, 500_000 + int(rng.integers(2**30)))
        neg = _negatives(batch_size // 5, rng)
        x = torch.cat([pos.x, neg])
        y = torch.cat([pos.labels, torch.full((len(neg),), INVALID)])
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def shapes32_quality(samples: Tensor, classifier: ShapesClassifier, reference: Tensor, threshold: float = 0.9,
                     batch_size: int = 500, *, resamples: int = 0, level: float = 0.95, seed: int = 0) -> dict:
    """For samples in [-1, 1] (N, 3, 32, 32): ``validity`` (the share the classifier reads as one of the 18
    classes with probability above ``threshold``), ``coverage`` (the share of the 18 classes among the valid
    samples), ``class_tv`` (total variation between the valid samples' class histogram and uniform), and the
    Frechet distance, kernel distance (``kid``) and precision/recall against ``reference`` (real images) in the
    classifier's features. With ``resamples`` > 0, ``intervals`` maps validity, fd, kid, precision and recall
    to their interval (lo, hi) at ``level`` (``bootstrap``: KID's percentile bootstrap, half-sampling for the
    others)."""
    def run(x):
        feats, probs = [], []
        for i in range(0, len(x), batch_size):
            f = classifier.features(x[i:i + batch_size].float().clamp(-1, 1))
            feats.append(f)
            probs.append(classifier.head(f).softmax(1))
        return torch.cat(feats), torch.cat(probs)

    f_fake, p_fake = run(samples)
    f_real, _ = run(reference)
    conf, label = p_fake.max(1)
    return _scores(f_real, f_fake, (conf > threshold) & (label != INVALID), label, INVALID, resamples, level, seed)


def _scores(f_real: Tensor, f_fake: Tensor, valid: Tensor, label: Tensor, classes: int, resamples: int, level: float,
            seed: int) -> dict:
    """The scores of a judged family: validity, coverage and class TV from the judge's verdicts, FD, KID and
    precision/recall in its features, and (``resamples`` > 0) their intervals."""
    counts = torch.bincount(label[valid], minlength=classes)[:classes].double()
    hist = counts / counts.sum().clamp(min=1)
    precision, recall = precision_recall(f_real, f_fake)
    out = {"validity": valid.double().mean().item(), "coverage": (counts > 0).double().mean().item(),
           "class_tv": 0.5 * (hist - 1 / classes).abs().sum().item(), "fd": frechet_distance(f_real, f_fake),
           "kid": kernel_distance(f_real, f_fake), "precision": precision, "recall": recall, "n": len(f_fake)}
    if resamples:
        kw = dict(resamples=resamples, level=level, seed=seed)
        flags = valid.double()[:, None]
        rate, distance = (0.0, 1.0), (0.0, np.inf)
        out["intervals"] = {
            "validity": bootstrap(lambda a, b: float(b.mean()), flags, flags, bounds=rate, **kw)[1:],
            "fd": bootstrap(frechet_distance, f_real, f_fake, bounds=distance, **kw)[1:],
            "kid": bootstrap(kernel_distance, f_real, f_fake, **kw)[1:],  # unbiased: it can be negative
            "precision": bootstrap(lambda a, b: precision_recall(a, b)[0], f_real, f_fake, bounds=rate, **kw)[1:],
            "recall": bootstrap(lambda a, b: precision_recall(a, b)[1], f_real, f_fake, bounds=rate, **kw)[1:]}
    return out


GRATING_MAX_RESIDUAL = 0.005  # mean squared residual (images in [-1, 1]) of a valid grating: RMS 0.07, 9 of 255
# The features' residuals start at this floor (RMS 0.03, 4 of 255): below it a grating is as good as its 8-bit
# rounding, and a continuous sample is not told from a rounded one by how much smaller its residual is.
GRATING_RESIDUAL_FLOOR = 1e-3
GRATING_CONTRAST = (0.4, 0.6)  # the fitted mean and peak-to-peak of the grating's position between its colours


def grating_fit(x: Tensor) -> dict:
    """Closed-form least squares of every gratings32 class to images x in [-1, 1] (N, 3, 32, 32): for palette (a, b)
    the pixels' position u = <x - a, b - a> / |b - a|^2 between the colours, and for wave vector k its projection on
    {1, cos, sin} of k (orthogonal on the integer grid, so the projection is the FFT's bin k: u ~ m + 2 Re(A e^(i k.x))).
    Returns per image and class (N, 12; class 3 orientation + palette) the mean squared residual of the
    reconstruction a + (b - a) u_fit, the fitted mean m and peak-to-peak 4|A| of u, and the fitted phase arg A."""
    x = x.detach().double().cpu()
    pal = torch.tensor(data_mod.GRATING_PALETTES, dtype=torch.float64) / 127.5 - 1  # (3, 2, 3) in [-1, 1]
    basis = torch.as_tensor(np.stack([data_mod.grating_basis(w) for w in data_mod.GRATING_WAVES]))  # (4, 32, 32)
    wave = torch.exp(-1j * basis)
    res, mean, p2p, phase = (torch.empty(len(x), 12, dtype=torch.float64) for _ in range(4))
    for p, (a, b) in enumerate(pal):
        d = b - a
        u = torch.einsum("nchw,c->nhw", x - a[:, None, None], d) / d.dot(d)
        m = u.mean((1, 2))
        for o in range(len(data_mod.GRATING_WAVES)):
            A = (u.to(torch.complex128) * wave[o]).mean((1, 2))
            fit = m[:, None, None] + 2 * (A[:, None, None] * wave[o].conj()).real
            recon = a[:, None, None] + d[:, None, None] * fit[:, None]
            k = 3 * o + p
            res[:, k] = (x - recon).square().mean((1, 2, 3))
            mean[:, k], p2p[:, k], phase[:, k] = m, 4 * A.abs(), A.angle()
    return {"residual": res, "mean": mean, "p2p": p2p, "phase": phase}


def grating_judge(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(valid, label, features) of images by ``grating_fit``: the class of least residual; valid where that residual
    is below ``GRATING_MAX_RESIDUAL`` and the fitted mean and peak-to-peak of u lie in ``GRATING_CONTRAST`` (0.5
    and 1 for a true grating; a flat image fits any class with no contrast). Features (38 per image): every class's
    log residual (from ``GRATING_RESIDUAL_FLOOR``), mean and peak-to-peak, and the cosine and sine of the best class's
    phase."""
    fit = grating_fit(x)
    best = fit["residual"].argmin(1)
    pick = lambda v: v.gather(1, best[:, None])[:, 0]  # noqa: E731
    lo, hi = GRATING_CONTRAST
    valid = ((pick(fit["residual"]) < GRATING_MAX_RESIDUAL) & (pick(fit["mean"]) - 0.5).abs().lt(hi - 0.5)
             & (pick(fit["p2p"]) > 2 * lo) & (pick(fit["p2p"]) < 2 * hi))
    phase = pick(fit["phase"])
    features = torch.cat([(fit["residual"] + GRATING_RESIDUAL_FLOOR).log(), fit["mean"], fit["p2p"],
                          torch.stack([phase.cos(), phase.sin()], 1)], 1)
    return valid, best, features


def gratings32_quality(samples: Tensor, reference: Tensor, *, resamples: int = 0, level: float = 0.95,
                       seed: int = 0) -> dict:
    """``shapes32_quality``'s scores for gratings32 samples in [-1, 1], judged in closed form (``grating_judge``):
    validity, coverage of the 12 classes, class TV, and FD, KID and precision/recall in the judge's 38 features
    against ``reference`` (real gratings), with intervals when ``resamples`` > 0."""
    valid, label, f_fake = grating_judge(samples)
    _, _, f_real = grating_judge(reference)
    return _scores(f_real, f_fake, valid, label, 12, resamples, level, seed)


def inception_features(images: Tensor, weights, batch_size: int = 200, device="cpu") -> Tensor:
    """The 2048-wide pool features of FID's Inception network for images in [-1, 1] (N, 1 or 3, H, W), from
    ``weights``: a TorchScript file of the network as StyleGAN2-ADA, EDM and clean-fid use it
    (``inception-2015-12-05.pt``: called with 8-bit RGB images of any size and ``return_features=True``, it
    resizes them to 299 itself). unstir never downloads it: pass the path of a copy you trust (TorchScript
    runs only torch operations, but it is code). Grayscale images are repeated to three channels.

    Why not torchmetrics, clean-fid or pytorch-fid: each needs torchvision (torchmetrics through
    torch-fidelity), which cannot be installed beside the CPU build of torch this project pins; clean-fid
    and EDM use this same file, and the Frechet distance of its features is ``frechet_distance``."""
    from pathlib import Path

    from .data import from_unit_range

    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"Inception weights {str(path)!r} do not exist: give the path of a TorchScript "
                         f"inception-2015-12-05.pt (unstir does not download it)")
    import warnings

    try:
        with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated; the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as err:
        raise ValueError(f"{str(path)!r} is not a TorchScript file ({str(err).splitlines()[0][:80]}); FID needs "
                         f"the TorchScript inception-2015-12-05.pt") from None
    x = _images(images)
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            part = from_unit_range(x[i:i + batch_size]).to(device)
            part = part.expand(-1, 3, -1, -1) if part.shape[1] == 1 else part
            feats.append(net(part, return_features=True).reshape(len(part), -1).double().cpu())
    return torch.cat(feats)


def fid(samples: Tensor, reference: Tensor, weights, batch_size: int = 200, device="cpu") -> float:
    """FID (Heusel et al. 2017): the Frechet distance between Inception features (``inception_features``) of
    ``samples`` and ``reference`` (images in [-1, 1]). Comparable with published values only at their sample
    sizes (50,000 against the training set) and image preprocessing."""
    return frechet_distance(inception_features(samples, weights, batch_size, device),
                            inception_features(reference, weights, batch_size, device))


def categorical_bits_per_dim(train: Tensor, test: Tensor) -> float:
    """Bits/dim of ``test`` under a categorical distribution over the 256 levels fitted independently at every
    position and channel to ``train`` (images in [-1, 1], 8-bit), with the Krichevsky-Trofimov estimate
    (counts + 1/2) so that a level absent from training costs finite bits. The baseline that ignores all
    dependence between pixels; a diffusion model's dequantised bits/dim should be below it."""
    from .data import from_unit_range

    tr, te = from_unit_range(_images(train)).long(), from_unit_range(_images(test)).long()
    if tr.shape[1:] != te.shape[1:]:
        raise ValueError(f"train and test images differ in shape: {tuple(tr.shape[1:])} and {tuple(te.shape[1:])}")
    flat_tr, flat_te = tr.flatten(1), te.flatten(1)
    counts = torch.zeros(256, flat_tr.shape[1], dtype=torch.float64)
    counts.scatter_add_(0, flat_tr, torch.ones_like(flat_tr, dtype=torch.float64))
    logp = ((counts + 0.5) / (len(flat_tr) + 128)).log2()
    return -logp.gather(0, flat_te).mean().item()


def file_bits_per_dim(test: Tensor, fmt: str = "PNG") -> float:
    """Bits/dim of ``test`` (images in [-1, 1], 8-bit) as lossless files, one per image, headers included: the
    classic compressor baseline. ``fmt``: 'PNG' (compression level 9, optimised) or 'WEBP' (lossless, method 6)."""
    import io

    from PIL import Image

    from .data import from_unit_range

    if fmt not in ("PNG", "WEBP"):
        raise ValueError(f"fmt must be 'PNG' or 'WEBP', got {fmt!r}")
    x = from_unit_range(_images(test))
    total = 0
    for im in x:
        arr = im.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buf = io.BytesIO()
        pil.save(buf, fmt, **({"optimize": True, "compress_level": 9} if fmt == "PNG" else
                              {"lossless": True, "quality": 100, "method": 6}))
        total += buf.tell()
    return 8 * total / x.numel()


def _images(x) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) < 1:
        raise ValueError(f"images must be (n, 1 or 3, height, width) in [-1, 1], got shape {tuple(x.shape)}")
    return x


def floor(classifier: ShapesClassifier, n: int, seed: int = 0) -> dict:
    """``shapes32_quality`` of n held-out real images (shapes32-test) against n training images: what a perfect
    sampler scores at this sample size."""
    real = data_mod.shapes32(n, seed).x
    held = data_mod.load("shapes32-test", n=n, seed=seed).x
    return shapes32_quality(held, classifier, real)


__all__ = ["frechet_distance", "precision_recall", "ShapesClassifier", "train_shapes_classifier", "shapes32_quality",
           "floor", "categorical_bits_per_dim", "file_bits_per_dim", "inception_features", "fid"]
