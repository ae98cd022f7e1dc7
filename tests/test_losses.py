"""Denoising score matching on the oracle: the exact model is the minimiser, and its loss is known."""

import math

import pytest
import torch

import unstir
from unstir.losses import TimeSampler, dsm_loss
from unstir.oracle import GaussianMixture, unequal_2d


def _batch(process, gm, n, weighting="simple", seed=0, discrete=False):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g)
    t, w = TimeSampler(process, weighting, discrete=discrete).sample(n, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, t, w, noise


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "ddpm"])
@pytest.mark.parametrize("weighting", ["simple", "sigma2", "likelihood", "min-snr"])
def test_exact_model_is_the_minimum(name, weighting):
    """With common random numbers, every perturbation of the exact eps raises the loss: the exact model
    is the irreducible minimum E||eps - E[eps|x_t]||^2."""
    p, gm = unstir.make_process(name), unequal_2d()
    exact = gm.denoiser(p)
    batch = _batch(p, gm, 20000, weighting)
    base = dsm_loss(exact, *batch, weighting=weighting).item()
    for kind, f in [("scale", lambda e: 1.05 * e), ("bias", lambda e: e + 0.05), ("rotate", lambda e: e.flip(1) * 0.1 + e)]:
        model = unstir.Denoiser(lambda x, t, f=f: f(gm.eps(x, t, p)), p, "eps", time_dtype=torch.float64)
        assert dsm_loss(model, *batch, weighting=weighting).item() > base, kind


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_loss_is_the_same_for_every_output_type(prediction):
    p, gm = unstir.make_process("vp"), unequal_2d()
    batch = _batch(p, gm, 512)
    ref = dsm_loss(gm.denoiser(p), *batch).item()
    oracle_model = gm.denoiser(p)
    net = lambda x, t: getattr(oracle_model(x, t), prediction)  # noqa: E731
    model = unstir.Denoiser(net, p, prediction, time_dtype=torch.float64)
    assert dsm_loss(model, *batch).item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
def test_exact_loss_at_fixed_t_matches_closed_form(name):
    """For Gaussian data N(mu, Sigma), E||eps - E[eps|x_t]||^2 / d = tr(I - sigma^2 C^-1) / d with
    C = alpha^2 Sigma + sigma^2 I, i.e. mean over eigenvalues l of alpha^2 l / (alpha^2 l + sigma^2)."""
    p = unstir.make_process(name)
    cov = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.8]], dtype=torch.float64)
    gm = GaussianMixture([1.0], torch.tensor([[0.3, -0.2, 1.0]]), cov[None])
    for t in (0.05, 0.3, 0.7):
        n = 100_000
        g = torch.Generator().manual_seed(1)
        x0 = gm.sample(n, g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tt = torch.full((n,), t, dtype=torch.float64)
        x_t = p.perturb(x0, tt, noise)
        per = (gm.eps(x_t, tt, p) - noise).square().mean(1)
        a, s = p.alpha(t).item(), p.sigma(t).item()
        lam = torch.linalg.eigvalsh(cov)
        closed = (a**2 * lam / (a**2 * lam + s**2)).mean().item()
        assert abs(per.mean().item() - closed) < 4 * per.std().item() / math.sqrt(n), (t, per.mean().item(), closed)
        w = torch.ones(n, dtype=torch.float64)
        assert dsm_loss(gm.denoiser(p), x0, tt, w, noise).item() == pytest.approx(per.mean().item(), rel=1e-12)


@pytest.mark.parametrize("discrete", [False, True])
def test_importance_sampling_keeps_the_likelihood_weighted_loss(discrete):
    """Drawing t ~ g^2/sigma^2 with the normaliser as weight is unbiased for the uniform-t g^2/sigma^2 loss:
    checked with a per-sample eps error f(t) = 1 + t/2 (eps errors are O(1) at every t, where importance
    sampling pays off because g^2/sigma^2 grows like 1/t near t_min)."""
    p = unstir.make_process("ddpm" if discrete else "vp")
    n = 200_000
    g = torch.Generator().manual_seed(0)
    plain = TimeSampler(p, "likelihood", discrete=discrete, importance=False)
    imp = TimeSampler(p, "likelihood", discrete=discrete, importance=True)
    t1, w1 = plain.sample(n, g)
    t2, w2 = imp.sample(n, g)
    f1, f2 = w1 * (1 + t1 / 2), w2 * (1 + t2 / 2)
    se = math.sqrt(f1.var().item() / n + f2.var().item() / n)
    assert abs(f1.mean().item() - f2.mean().item()) < 4 * se
    assert f2.var() < f1.var(), "importance sampling must reduce the variance"
    if discrete:
        labels = p.timestep(t2)
        assert torch.equal(labels, labels.round())


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "ddpm", "rf", "vp_cosine"])
def test_min_snr_weight_is_the_x0_loss_clipped_at_gamma(name):
    """Min-SNR-gamma (Hang et al. 2023): the weight on the x0 error is min(SNR, gamma). On the eps error that
    is min(SNR, gamma) / SNR, checked against alpha and sigma directly; and the weighted eps loss equals the
    min(SNR, gamma)-weighted x0 loss of the same (imperfect) model."""
    p = unstir.make_process(name)
    t, w = TimeSampler(p, "min-snr", snr_gamma=3.0).sample(4000, torch.Generator().manual_seed(0))
    snr = (p.alpha(t) / p.sigma(t)) ** 2
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(3.0, dtype=torch.float64)) / snr, rtol=1e-9)
    assert (w == 1).any() and (w < 0.5).any(), "the draws must cover both sides of SNR = gamma"
    gm = unequal_2d()
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(len(t), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    model = unstir.Denoiser(lambda x, tt: 0.9 * gm.eps(x, tt, p), p, "eps", time_dtype=torch.float64)
    out = model(p.perturb(x0, t, noise), t)
    x0_loss = (torch.minimum(snr, torch.tensor(3.0, dtype=torch.float64)) * (out.x0 - x0).square().mean(1)).mean()
    assert dsm_loss(model, x0, t, w, noise, "min-snr").item() == pytest.approx(x0_loss.item(), rel=1e-9)


def test_bad_snr_gamma():
    for bad in (0, -1.0, float("inf"), True, "5"):
        with pytest.raises(ValueError, match=r"snr_gamma must be a positive number, got"):
            TimeSampler(unstir.make_process("vp"), "min-snr", snr_gamma=bad)


def test_snr_gamma_without_min_snr_is_refused(tmp_path):
    from unstir.training import TrainConfig, train

    with pytest.raises(ValueError, match=r"snr_gamma=3.0 is the gamma of the 'min-snr' weighting; this run's "
                                         r"weighting is 'simple'"):
        train(TrainConfig(data="moons", steps=2, snr_gamma=3.0), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"snr_gamma must be a positive number, got -1"):
        train(TrainConfig(data="moons", steps=2, weighting="min-snr", snr_gamma=-1), tmp_path / "x", progress=False)


def test_bad_weighting_name():
    with pytest.raises(ValueError, match=r"unknown weighting 'elbo'; choose one of"):
        TimeSampler(unstir.make_process("vp"), "elbo")


@pytest.mark.parametrize("name,discrete", [("rf", False), ("vp", False), ("ve", False), ("ddpm", True)])
@pytest.mark.parametrize("m,s", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_times(name, discrete, m, s):
    """Esser et al. (2024, sec. 3.1): t = t_min + (T - t_min) u with logit(u) ~ N(m, s^2). Continuous: logit(u) has
    mean m and std s (4 standard errors). Discrete: integer steps k = floor(N u), whose CDF
    P(k < j) = Phi((logit(j / N) - m) / s) is checked at a few j (4 binomial standard errors). The weights
    are the uniform-t weights."""
    p = unstir.make_process(name)
    n = 40_000
    t, w = TimeSampler(p, "simple", discrete=discrete, time_sampling="logit-normal",
                       logit_normal=(m, s)).sample(n, torch.Generator().manual_seed(3))
    assert torch.equal(w, torch.ones(n, dtype=torch.float64))
    assert t.min() >= p.t_min and t.max() <= p.T
    if discrete:
        k = p.timestep(t)
        assert torch.equal(k, k.round())
        N = p.num_steps
        for j in (N // 10, N // 3, N // 2, 4 * N // 5):
            cdf = 0.5 * (1 + math.erf((math.log(j / (N - j)) - m) / (s * math.sqrt(2))))
            share = (k < j).double().mean().item()
            assert abs(share - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / n), (j, share, cdf)
    else:
        z = torch.logit((t - p.t_min) / (p.T - p.t_min))
        assert abs(z.mean().item() - m) < 4 * s / math.sqrt(n)
        assert abs(z.std().item() - s) < 4 * s / math.sqrt(2 * n)
    uniform, _ = TimeSampler(p, "simple", discrete=discrete).sample(n, torch.Generator().manual_seed(3))
    mid = lambda x: ((x - p.t_min) / (p.T - p.t_min) - 0.5).abs().lt(0.25).double().mean().item()  # noqa: E731
    assert mid(t) > mid(uniform) + 0.05, "logit-normal puts more of the batch at intermediate times"


def test_logit_normal_keeps_the_weighting_and_the_minimum():
    """min-snr's weight is a function of t alone, so under logit-normal times it is the same weight; and the
    exact model stays the minimiser of the reweighted loss."""
    p, gm = unstir.make_process("rf"), unequal_2d()
    t, w = TimeSampler(p, "min-snr", time_sampling="logit-normal").sample(4000, torch.Generator().manual_seed(0))
    snr = (p.alpha(t) / p.sigma(t)) ** 2
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-9)
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(20000, g)
    t, w = TimeSampler(p, "velocity", time_sampling="logit-normal").sample(20000, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    base = dsm_loss(gm.denoiser(p), x0, t, w, noise, "velocity").item()
    for f in (lambda e: 1.05 * e, lambda e: e + 0.05):
        model = unstir.Denoiser(lambda x, tt, f=f: f(gm.eps(x, tt, p)), p, "eps", time_dtype=torch.float64)
        assert dsm_loss(model, x0, t, w, noise, "velocity").item() > base


def test_bad_time_sampling(tmp_path):
    from unstir.training import TrainConfig, train

    p = unstir.make_process("rf")
    with pytest.raises(ValueError, match=r"unknown time_sampling 'lognormal'; choose one of"):
        TimeSampler(p, "simple", time_sampling="lognormal")
    for bad in ((0.0, 0.0), (float("nan"), 1.0), (0.0, -1.0), "ab", (1.0,)):
        with pytest.raises(ValueError, match=r"logit_normal (needs a finite mean and a std > 0|must be two numbers)"):
            TimeSampler(p, "simple", time_sampling="logit-normal", logit_normal=bad)
    with pytest.raises(ValueError, match=r"time_sampling='logit-normal' reweights the loss over t; the 'likelihood'"):
        TimeSampler(p, "likelihood", time_sampling="logit-normal")
    for cfg, msg in [(dict(time_sampling="logit-normal", weighting="likelihood"), r"the 'likelihood' weighting keeps"),
                     (dict(logit_normal=(0.5, 1.0)), r"logit_normal=\(0.5, 1.0\) is the \(mean, std\) of time_sampling="
                                                     r"'logit-normal'; this run's time_sampling is 'uniform'"),
                     (dict(time_sampling="beta"), r"unknown time_sampling 'beta'")]:
        with pytest.raises(ValueError, match=msg):
            train(TrainConfig(data="moons", steps=2, **cfg), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists(), "refused before any work"


def test_cli_logit_normal_is_recorded_and_resumed(tmp_path, capsys):
    """`unstir train --time-sampling logit-normal --logit-normal M S` records both; an interrupted run resumed
    from the command line ends with the weights of an uninterrupted one, and a resume asking for another
    time distribution is refused."""
    import json

    from safetensors.torch import load_file

    from unstir.cli import main
    from unstir.training import TrainConfig, train

    opts = dict(data="moons", batch_size=32, steps=20, checkpoint_every=10)
    plain = ["train", "--data", "moons", "--batch-size", "32", "--steps", "20", "--checkpoint-every", "10", "--quiet"]
    common = plain + ["--time-sampling", "logit-normal", "--logit-normal", "0.5", "0.8"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    cfg = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert cfg["time_sampling"] == "logit-normal" and cfg["logit_normal"] == [0.5, 0.8]
    train(TrainConfig(**opts, time_sampling="logit-normal", logit_normal=(0.5, 0.8)), tmp_path / "b",
          progress=False, stop_after=15)
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--quiet"]) == 0
    assert main(plain + ["--out", str(tmp_path / "u")]) == 0
    a, b, u = (load_file(str(tmp_path / r / "checkpoint-20.safetensors")) for r in "abu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], u[k]) for k in a), "the time distribution must change the training"
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--quiet", "--logit-normal", "0", "1",
                 "--steps", "30"]) != 0
    assert "--logit-normal: run has [0.5, 0.8], asked [0.0, 1.0]" in capsys.readouterr().err
