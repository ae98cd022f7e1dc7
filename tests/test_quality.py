"""Sample quality: the Frechet distance against its identities and scipy's matrix square root, precision and
recall on sets whose answer is known, the shapes32 scores' bookkeeping, and the bits/dim baselines."""

import numpy as np
import pytest
import scipy.linalg
import torch

from unstir import quality


def _gauss(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)


def test_frechet_distance_identities_and_scipy():
    a, b = _gauss(400, 6, 0), _gauss(300, 6, 1)
    mu, cov = a.mean(0), torch.cov(a.T)
    assert abs(quality.frechet_distance(a, a)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    # A shift moves only the means: FD = ||c||^2.
    assert quality.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # 2a: covariance 4 S, so Tr(S + 4S - 2 (4 S^2)^(1/2)) = Tr S, and the means differ by mu.
    assert quality.frechet_distance(a, 2 * a) == pytest.approx(float(mu @ mu + cov.trace()), rel=1e-9)
    # Two non-commuting covariances: against scipy's sqrtm of the product (pytorch-fid's formula).
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert quality.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert quality.frechet_distance(b, a) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="different widths"):
        quality.frechet_distance(a, b[:, :5])
    with pytest.raises(ValueError, match=r"\(n >= 2, width\)"):
        quality.frechet_distance(a[0], b)


def test_precision_recall_on_sets_with_known_answers():
    real = _gauss(200, 4, 2)
    assert quality.precision_recall(real, real) == (1.0, 1.0)
    assert quality.precision_recall(real, real + 1e3) == (0.0, 0.0)
    # Real has two far clusters; fake is exactly one of them: every fake point is a real point (precision 1),
    # and the real points of the other cluster lie outside the fake manifold (recall 1/2).
    two = torch.cat([real[:100], real[100:] + 1e3])
    assert quality.precision_recall(two, two[:100]) == (1.0, 0.5)
    assert quality.precision_recall(two[:100], two) == (0.5, 1.0)
    with pytest.raises(ValueError, match="more than k = 3"):
        quality.precision_recall(real, real[:3])


class _Oracle(torch.nn.Module):
    """Stands in for the factor classifier: features are the mean colour, and the label is given by the
    image's top-left pixel (a test fixture, so that the scores' bookkeeping has a known answer)."""

    def features(self, x):
        return torch.cat([x.mean((2, 3)), x[:, :, 0, 0]], 1)

    def head(self, f):
        label = ((f[:, 3] + 1) * 10).round().long().clamp(0, quality.INVALID)
        return torch.nn.functional.one_hot(label, quality.INVALID + 1).float() * 50


def test_shapes32_quality_bookkeeping():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(90, 3, 32, 32, generator=g) * 2 - 1

    def labelled(labels):
        x = torch.rand(len(labels), 3, 32, 32, generator=g) * 2 - 1
        x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / 10 - 1
        return x

    every = labelled([i % 18 for i in range(90)])
    scores = quality.shapes32_quality(every, _Oracle(), reference)
    assert scores["validity"] == 1.0 and scores["coverage"] == 1.0 and scores["class_tv"] == pytest.approx(0.0, abs=1e-12)
    assert scores["n"] == 90 and scores["fd"] >= 0 and 0 <= scores["precision"] <= 1
    # A third read as 'not a shape', the rest all class 0: validity 2/3, coverage 1/18, TV = 1 - 1/18.
    skewed = labelled([quality.INVALID] * 30 + [0] * 60)
    scores = quality.shapes32_quality(skewed, _Oracle(), reference)
    assert scores["validity"] == pytest.approx(2 / 3) and scores["coverage"] == pytest.approx(1 / 18)
    assert scores["class_tv"] == pytest.approx(1 - 1 / 18)


def test_negatives_are_not_single_palette_shapes_and_the_classifier_has_the_right_shapes():
    neg = quality._negatives(64, np.random.default_rng(0))
    assert neg.shape == (64, 3, 32, 32) and neg.min() >= -1 and neg.max() <= 1
    net = quality.ShapesClassifier()
    assert net(neg).shape == (64, quality.INVALID + 1) and net.features(neg).shape == (64, 128)


def test_bits_per_dim_baselines_against_closed_forms():
    flat = torch.zeros(10, 3, 4, 4)  # every pixel at level 127.5 -> 128
    # Every training count sits on one level: -log2((10 + 1/2) / (10 + 256/2)) bits at every dimension.
    assert quality.categorical_bits_per_dim(flat, flat) == pytest.approx(-np.log2(10.5 / 138), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2000, 1, 2, 2), generator=g) / 127.5 - 1
    held = torch.randint(0, 256, (500, 1, 2, 2), generator=g) / 127.5 - 1
    # Uniform levels: the fitted categorical approaches 8 bits; its excess is the estimation cost (~0.1 here).
    assert 8.0 < quality.categorical_bits_per_dim(noise, held) < 8.2
    # Lossless files: uniform noise cannot go below 8 bits/dim; a flat image goes far below.
    big_noise = torch.randint(0, 256, (4, 3, 32, 32), generator=g) / 127.5 - 1
    for fmt in ("PNG", "WEBP"):
        assert quality.file_bits_per_dim(big_noise, fmt) > 8.0
        assert quality.file_bits_per_dim(torch.zeros(4, 3, 32, 32), fmt) < 0.5
    with pytest.raises(ValueError, match="'PNG' or 'WEBP'"):
        quality.file_bits_per_dim(flat, "JPEG")
    with pytest.raises(ValueError, match="differ in shape"):
        quality.categorical_bits_per_dim(flat, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(n, 1 or 3, height, width\)"):
        quality.file_bits_per_dim(torch.zeros(3, 4))


def test_likelihood_prints_the_baselines_of_its_images(tmp_path):
    from types import SimpleNamespace

    from unstir import data
    from unstir.cli.ode import image_baselines

    x = data.load("shapes32-test", n=20).x
    run = SimpleNamespace(run_info={"config": {"data": "shapes32", "n_data": 50, "seed": 0}})
    want = (f"per-pixel categorical {quality.categorical_bits_per_dim(data.shapes32(50, 0).x, x):.4f}, "
            f"PNG {quality.file_bits_per_dim(x):.4f}, WebP {quality.file_bits_per_dim(x, 'WEBP'):.4f}")
    assert image_baselines(run, x) == want
    run.run_info["config"]["data"] = str(tmp_path / "gone")
    assert image_baselines(run, x).endswith("(the per-pixel categorical needs the training data, which is gone)")


class _FakeInception(torch.nn.Module):
    """A random-weight stand-in with the TorchScript Inception's interface: 8-bit RGB in, any size, resized
    inside, ``return_features=True`` gives the pooled features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.interpolate(x.float(), size=(29, 29), mode="bilinear") / 127.5 - 1
        f = self.conv(x).relu().mean((2, 3))
        return f if return_features else f.sum(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_fid_plumbing_with_random_weights(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    net = torch.jit.script(_FakeInception())
    net.save(str(weights))
    a = torch.rand(30, 3, 12, 12) * 2 - 1
    b = torch.rand(40, 1, 12, 12) * 2 - 1
    fa = quality.inception_features(a, weights, batch_size=7)
    with torch.no_grad():
        want = net(((a + 1) * 127.5).round().to(torch.uint8), return_features=True).double()
    torch.testing.assert_close(fa, want)  # batching, the 8-bit conversion and the call, as the network sees them
    assert quality.inception_features(b, weights).shape == (40, 16)  # grayscale goes in as three equal channels
    assert quality.fid(a, a, weights) == pytest.approx(0.0, abs=1e-9)
    assert quality.fid(a, b, weights) == pytest.approx(
        quality.frechet_distance(fa, quality.inception_features(b, weights)), rel=1e-12)
    with pytest.raises(ValueError, match="does not download it"):
        quality.fid(a, b, tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="is not a TorchScript file"):
        quality.fid(a, b, tmp_path / "bad.pt")


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_precision_recall_match_a_loop_over_the_definition(k):
    """Each point's radius is the distance to its k-th nearest *other* point of its set (Kynkaanniemi et al.
    2019); precision is the share of fake points within some real ball, recall the reverse. A plain loop over
    that definition, on a shifted Gaussian where the answers move with k: an off-by-one in k (the self-distance
    counted as a neighbour, ``kthvalue(k)``) fails here."""
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 4))
    fake = rng.normal(size=(250, 4)) + 1.0

    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return np.array(out)

    def inside(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    precision, recall = quality.precision_recall(torch.as_tensor(real), torch.as_tensor(fake), k=k)
    assert precision == pytest.approx(inside(fake, real, radii(real)), abs=1e-12)
    assert recall == pytest.approx(inside(real, fake, radii(fake)), abs=1e-12)


def _expected_poly_kernel(m1, S1, m2, S2):
    """E (x . y / d + 1)^3 for independent x ~ N(m1, S1), y ~ N(m2, S2), in closed form: with s = x . y,
    E s = m1.m2, E s^2 = tr((S1 + m1 m1^T)(S2 + m2 m2^T)), and given y, s ~ N(m1.y, y^T S1 y), so
    E s^3 = E[(m1.y)^3 + 3 (m1.y)(y^T S1 y)] = u^3 + 3 u v + 3 [u (m2^T S1 m2 + tr(S1 S2)) + 2 m1^T S2 S1 m2],
    u = m1.m2, v = m1^T S2 m1."""
    d = len(m1)
    u, v = m1 @ m2, m1 @ S2 @ m1
    e1 = u
    e2 = np.trace((S1 + np.outer(m1, m1)) @ (S2 + np.outer(m2, m2)))
    e3 = u**3 + 3 * u * v + 3 * (u * (m2 @ S1 @ m2 + np.trace(S1 @ S2)) + 2 * m1 @ S2 @ S1 @ m2)
    return e3 / d**3 + 3 * e2 / d**2 + 3 * e1 / d + 1


def _two_gaussians():
    rng = np.random.default_rng(0)
    d = 4
    m1, m2 = np.zeros(d), np.array([0.6, -0.3, 0.2, 0.0])
    A, B = rng.normal(size=(d, d)) / 2, rng.normal(size=(d, d)) / 2
    return m1, A @ A.T + 0.5 * np.eye(d), m2, B @ B.T + 0.5 * np.eye(d)


def test_kernel_distance_is_unbiased_for_the_closed_form_mmd():
    """KID between two 4-D Gaussians: the closed-form MMD^2 (E k(a, a') + E k(b, b') - 2 E k(a, b)) against the
    mean of 200 estimates at n = 100 (unbiased: within 4 standard errors), and a single estimate at n = 3000
    near it. The Frechet distance at n = 100 between two samples of one Gaussian is biased upward; KID is not."""
    from unstir.quality import frechet_distance, kernel_distance

    m1, S1, m2, S2 = _two_gaussians()
    truth = (_expected_poly_kernel(m1, S1, m1, S1) + _expected_poly_kernel(m2, S2, m2, S2)
             - 2 * _expected_poly_kernel(m1, S1, m2, S2))
    rng = np.random.default_rng(1)
    draws = [kernel_distance(rng.multivariate_normal(m1, S1, 100), rng.multivariate_normal(m2, S2, 100))
             for _ in range(200)]
    assert abs(np.mean(draws) - truth) < 4 * np.std(draws) / np.sqrt(200), (np.mean(draws), truth)
    big = kernel_distance(rng.multivariate_normal(m1, S1, 3000), rng.multivariate_normal(m2, S2, 3000))
    assert abs(big - truth) < 0.2 * truth, (big, truth)
    same = [(kernel_distance(x, y), frechet_distance(x, y)) for x, y in
            ((rng.multivariate_normal(m1, S1, 100), rng.multivariate_normal(m1, S1, 100)) for _ in range(100))]
    kid0, fd0 = np.array(same).T
    assert abs(kid0.mean()) < 4 * kid0.std() / 10 and fd0.mean() > 10 * fd0.std() / 10


@pytest.mark.parametrize("which", ["kid", "frechet", "precision"])
def test_bootstrap_interval_covers_at_its_nominal_rate(which):
    """Over 200 simulated pairs of samples (n = 150 each, 4-D Gaussians a mean shift apart), the 90% percentile
    bootstrap interval of KID covers the closed-form value in 0.82-0.97 of them (nominal 0.9, 3.5 binomial sd).
    For the Frechet distance and precision, whose estimates are biased at this n, the half-sampling interval is
    checked against the mean of the estimates at this n instead (what an interval of a biased statistic can
    cover). A with-replacement bootstrap of precision covered 0.23 here (copies have k-NN radius 0)."""
    from unstir.quality import bootstrap, frechet_distance, kernel_distance, precision_recall

    m1, S1, m2, S2 = _two_gaussians()
    rng = np.random.default_rng(2)
    if which == "kid":
        metric, reps, resamples = kernel_distance, 200, 200
        truth = (_expected_poly_kernel(m1, S1, m1, S1) + _expected_poly_kernel(m2, S2, m2, S2)
                 - 2 * _expected_poly_kernel(m1, S1, m2, S2))
    else:
        metric = frechet_distance if which == "frechet" else (lambda a, b: precision_recall(a, b)[0])
        reps, resamples = 60, 100
        truth = np.mean([metric(torch.as_tensor(rng.multivariate_normal(m1, S1, 150)),
                                torch.as_tensor(rng.multivariate_normal(m2, S2, 150))) for _ in range(300)])
    hits = 0
    for r in range(reps):
        _, lo, hi = bootstrap(metric, rng.multivariate_normal(m1, S1, 150), rng.multivariate_normal(m2, S2, 150),
                              resamples=resamples, level=0.9, seed=r)
        hits += lo <= truth <= hi
    rate, sd = hits / reps, np.sqrt(0.9 * 0.1 / reps)
    assert 0.9 - 3.5 * sd <= rate <= 0.9 + 2.5 * sd, (which, rate)


def test_bootstrap_of_kid_leaves_out_copies_of_one_point():
    """The kernel-matrix shortcut equals recomputing KID on the resampled sets with the duplicate pairs left out
    (a direct loop), and the interval brackets the estimate."""
    from unstir.quality import _kid_from_counts, _poly_kernel, bootstrap, kernel_distance, overlap

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) + 0.5
    ia, ib = rng.integers(0, 30, 30), rng.integers(0, 25, 25)

    def within(x, idx):
        pairs = [(i, j) for i in range(len(idx)) for j in range(len(idx)) if idx[i] != idx[j]]
        return np.mean([((x[idx[i]] @ x[idx[j]]) / 3 + 1) ** 3 for i, j in pairs])

    direct = within(a, ia) + within(b, ib) - 2 * np.mean(_poly_kernel(a[ia], b[ib]))
    fast = _kid_from_counts(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b),
                            np.bincount(ia, minlength=30)[None].astype(float), np.bincount(ib, minlength=25)[None].astype(float))
    assert abs(fast[0] - direct) < 1e-10
    v, lo, hi = bootstrap(kernel_distance, a, b, resamples=100)
    assert lo < v < hi and overlap((v, lo, hi), (hi, hi, hi + 1)) and not overlap((0, 0, 1), (2, 2, 3))
    with pytest.raises(ValueError, match="resamples must be an integer >= 10"):
        bootstrap(kernel_distance, a, b, resamples=3)


def test_half_sampling_interval_stays_in_the_statistics_range():
    """The Frechet distance of two small samples of one Gaussian (n = 20, 4-D): half-samples spread widely, and the
    interval re-centred on the estimate reaches below 0 unless the bounds clip it there (what they are for)."""
    from unstir.quality import bootstrap, frechet_distance

    rng = np.random.default_rng(3)  # seeds 0, 1, 3 and 5 reach below 0 (-0.05 to -0.30); 2 and 4 do not
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    free = bootstrap(frechet_distance, a, b, resamples=200, seed=1)
    clipped = bootstrap(frechet_distance, a, b, resamples=200, seed=1, bounds=(0.0, np.inf))
    assert free[1] < 0 and clipped[1] == 0.0 and clipped[2] == free[2] and clipped[0] == free[0] > 0


def test_gratings32_factors_are_read_back_in_closed_form():
    """Every real grating is valid and read as its own class (orientation x palette) with its phase; the judge
    tolerates 8-bit rounding and noise of std 0.04 and refuses what is not one grating of the family: flat images
    (any class fits them, with no contrast), noise of std 0.08, the average of two gratings of other orientations,
    shapes32 images. The held-out set scores at the floor: FD's interval reaches 0, coverage 1."""
    from unstir import data
    from unstir.quality import grating_fit, grating_judge, gratings32_quality

    d, f = data.gratings32(480, 5, return_factors=True)
    valid, label, features = grating_judge(d.x)
    assert valid.all() and torch.equal(label, d.labels) and features.shape == (480, 38)
    phase = grating_fit(d.x)["phase"].gather(1, label[:, None])[:, 0].numpy()
    assert np.abs(np.angle(np.exp(1j * (phase - f["phase"])))).max() < 0.02
    g = torch.Generator().manual_seed(0)
    assert grating_judge(d.x + 0.04 * torch.randn(d.x.shape, generator=g))[0].all()
    assert not grating_judge(d.x + 0.08 * torch.randn(d.x.shape, generator=g))[0].any()
    assert not grating_judge(d.x.mean((2, 3), keepdim=True).expand_as(d.x))[0].any()
    other = (f["wave"][:240] % 2) != (f["wave"][240:] % 2)  # 0/90 degrees against 45/135
    assert not grating_judge((d.x[:240][other] + d.x[240:][other]) / 2)[0].any()
    assert not grating_judge(data.shapes32(100, 0).x)[0].any()
    s = gratings32_quality(data.load("gratings32-test", n=480).x, d.x, resamples=50)
    assert s["validity"] == 1.0 and s["coverage"] == 1.0 and s["intervals"]["fd"][0] == 0.0
