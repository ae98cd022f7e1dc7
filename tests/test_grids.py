"""The time-grid convention: first point exactly T, last point t_min (then an optional 0)."""

import pytest
import torch

import unstir
from unstir.grids import GRIDS

from .conftest import ALL_PROCESSES


@pytest.mark.parametrize("name", ALL_PROCESSES)
@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 17, 100, 1000])
@pytest.mark.parametrize("denoise", [True, False])
def test_grid_end_points_and_length(name, kind, steps, denoise):
    p = unstir.make_process(name)
    grid = unstir.time_grid(p, steps, kind, denoise=denoise)
    assert grid.dtype == torch.float64
    assert grid.shape == (steps + 1,), "steps counts intervals: steps + 1 points"
    assert grid[0].item() == p.T, "the first point is exactly T"
    assert (torch.diff(grid) < 0).all(), "strictly decreasing"
    if denoise:
        assert grid[-1].item() == 0.0, "denoise ends with the step to 0"
        if steps >= 2:
            assert grid[-2].item() == p.t_min
        inner = grid[:-1]
    else:
        assert grid[-1].item() == p.t_min
        inner = grid
    assert inner.min() >= p.t_min and inner.max() <= p.T


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm"])
def test_grid_spacings(name):
    p = unstir.make_process(name)
    n = 12
    lam = p.log_snr(unstir.time_grid(p, n, "log_snr", denoise=False))
    torch.testing.assert_close(torch.diff(lam), torch.full((n,), torch.diff(lam).mean().item(), dtype=torch.float64),
                               rtol=1e-8, atol=1e-9)
    t = unstir.time_grid(p, n, "uniform", denoise=False)
    torch.testing.assert_close(torch.diff(t), torch.full((n,), (p.t_min - p.T) / n, dtype=torch.float64))
    for kind, power in (("quadratic", 2), ("cubic", 3)):
        q = unstir.time_grid(p, n, kind, denoise=False)
        u = ((q - p.t_min) / (p.T - p.t_min)) ** (1 / power)
        torch.testing.assert_close(torch.diff(u), torch.full((n,), -1.0 / n, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    e = unstir.time_grid(p, n, "edm", denoise=False)
    sbar = torch.exp(-p.log_snr(e)) ** (1 / 7)
    torch.testing.assert_close(torch.diff(sbar), torch.full((n,), torch.diff(sbar).mean().item(), dtype=torch.float64),
                               rtol=1e-6, atol=1e-8)
    s = torch.sigmoid(-p.log_snr(unstir.time_grid(p, n, "blend", denoise=False)))  # sigma / (alpha + sigma)
    s_lam = torch.sigmoid(-lam)
    s_uni = torch.linspace(s_lam[0].item(), s_lam[-1].item(), n + 1, dtype=torch.float64)
    torch.testing.assert_close(s, 0.5 * (s_lam + s_uni), rtol=0, atol=1e-12)


def test_blend_grid_on_rf():
    """On rf (s = t) the blend is [0.999, 0.942, ..., 0.001, 0], the 10-step grid measured on learned image
    models: the mean of the uniform and log_snr grids' times."""
    p = unstir.make_process("rf")
    b = unstir.time_grid(p, 10, "blend")
    assert p.T == 0.999 and p.t_min == 0.001
    torch.testing.assert_close(b, 0.5 * (unstir.time_grid(p, 10, "uniform") + unstir.time_grid(p, 10, "log_snr")),
                               rtol=0, atol=1e-12)
    expect = [0.999, 0.942, 0.878, 0.788, 0.619, 0.381, 0.212, 0.122, 0.058, 0.001, 0.0]
    torch.testing.assert_close(b, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=5e-4)


def test_nfe_equals_steps_for_first_order_samplers():
    p = unstir.make_process("vp")
    model = unstir.oracle.ring().denoiser(p)
    for steps in (1, 2, 7):
        for sampler in ("ddim", "ddpm", "dpm++2m", "euler_maruyama"):
            r = unstir.sample(model, p, (4, 2), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
            assert r.nfe == steps, (sampler, steps, r.nfe)


def test_explicit_grid_on_the_command_line(tmp_path, capsys):
    """`sample --grid T,0.5,0.1,0` samples on exactly those times: the same samples as ``unstir.sample`` with that
    tensor, 3 evaluations; a bad grid, a grid name that is not one, or a --steps/--nfe that disagrees with the
    grid's intervals is one line, exit 2, nothing written."""
    import numpy as np

    from unstir.cli import main
    from unstir.distributed import sample_sharded
    from unstir.runs import load_run

    run = tmp_path / "run"
    assert main(["train", "--steps", "10", "--out", str(run), "--quiet"]) == 0
    model = load_run(run)
    T = model.process.T
    times = f"{T!r},0.5,0.1,0"
    out = tmp_path / "s.npy"
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--sampler", "dpm++2m", "--grid", times, "-n", "32",
                 "--out", str(out), "--quiet"]) == 0
    assert "(3 model evaluations" in capsys.readouterr().out
    grid = torch.tensor([T, 0.5, 0.1, 0.0], dtype=torch.float64)
    with torch.no_grad():
        x, nfe = sample_sharded(model, 32, seed=0, sampler="dpm++2m", grid=grid)
    assert nfe == 3
    assert np.array_equal(np.load(out), x.numpy())
    # the same grid by --nfe: dpm++2m takes one evaluation a step
    assert main(["sample", "--run", str(run), "--sampler", "dpm++2m", "--grid", times, "--nfe", "3", "-n", "32",
                 "--out", str(out), "--quiet", "--force"]) == 0
    assert np.array_equal(np.load(out), x.numpy())
    bad = tmp_path / "bad.npy"
    for argv, text in [(["--grid", "0.5,0.9,0"], "strictly decreasing"),
                       (["--grid", f"{2 * T},0.5,0"], "must lie in [t_min, T]"),
                       (["--grid", "lin"], "neither a grid name"),
                       (["--grid", times, "--steps", "5"], "--grid has 3 intervals and --steps says 5"),
                       (["--grid", times, "--sampler", "ode_heun", "--nfe", "3"], "and --nfe says 3")]:
        assert main(["sample", "--run", str(run), "-n", "8", "--out", str(bad)] + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, (argv, err)
    assert not bad.exists()


def test_encode_and_decode_take_a_grid_on_the_command_line(tmp_path, capsys):
    """`encode --sampler ddim --grid T,0.8,...,t_min` gives ``unstir.encode``'s latents on that tensor (9 evaluations)
    and `decode` on the same grid ``unstir.decode``'s data; a named --grid is the named spacing.
    --grid with the adaptive ode_rk45, a grid ending at 0 (not invertible) or outside [t_min, T], and a --steps
    that disagrees are one line, exit 2, nothing written."""
    import numpy as np

    from unstir.cli import main
    from unstir.inversion import decode, encode
    from unstir.runs import load_run

    run = tmp_path / "run"
    assert main(["train", "--steps", "10", "--out", str(run), "--quiet"]) == 0
    model = load_run(run)
    T, t_min = model.process.T, model.process.t_min
    inner = [0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.06, 0.03]
    times = ",".join(map(repr, [T, *inner, t_min]))
    z, x = tmp_path / "z.npy", tmp_path / "x.npy"
    assert main(["encode", "--run", str(run), "-n", "16", "--sampler", "ddim", "--grid", times,
                 "--out", str(z), "--quiet"]) == 0
    assert "(9 model evaluations)" in capsys.readouterr().out
    held = torch.from_numpy(np.load(tmp_path / "z.input.npy"))
    grid = torch.tensor([T, *inner, t_min], dtype=torch.float64)
    with torch.no_grad():
        want = encode(model, held, sampler="ddim", grid=grid)
        back = decode(model, want.z, sampler="ddim", grid=grid)
    assert np.array_equal(np.load(z), want.z.numpy())
    assert main(["decode", "--run", str(run), "--latents", str(z), "--sampler", "ddim", "--grid", times,
                 "--out", str(x), "--quiet"]) == 0
    assert np.array_equal(np.load(x), back.x.numpy())
    assert main(["encode", "--run", str(run), "-n", "16", "--sampler", "ddim", "--grid", "uniform", "--steps", "4",
                 "--out", str(z), "--quiet", "--force"]) == 0
    with torch.no_grad():
        assert np.array_equal(np.load(z), encode(model, held, sampler="ddim", grid="uniform", steps=4).z.numpy())
    capsys.readouterr()
    bad = tmp_path / "bad.npy"
    for verb, argv, text in [
            ("encode", ["--grid", times], "--grid sets the grid of a fixed-step sampler; ode_rk45"),
            ("encode", ["--sampler", "ddim", "--grid", f"{T!r},0.5,0"], "must end at t_min, not 0"),
            ("decode", ["--sampler", "ddim", "--grid", f"{2 * T},0.5,{t_min!r}"], "must lie in [t_min, T]"),
            ("decode", ["--sampler", "ddim", "--grid", times, "--steps", "5"], "--grid has 9 intervals and --steps says 5"),
            ("encode", ["--sampler", "ddim", "--grid", "lin"], "neither a grid name")]:
        extra = ["--latents", str(z)] if verb == "decode" else ["-n", "4"]
        assert main([verb, "--run", str(run), "--out", str(bad)] + extra + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, (argv, err)
    assert not bad.exists()
