"""Progressive distillation (unstir.distill): the nested grid, the target's algebra, a student of the exact oracle
against the exact probability-flow map, and the `distill` verb: a run like any other, exact resume, bad input."""

import json
import math

import numpy as np
import pytest
import torch

from unstir import oracle, sample
from unstir.cli import main
from unstir.distill import (default_teacher_steps, distill, distill_grid, progressive_loss, progressive_target, rounds,
                            sample_grid)
from unstir.grids import GRIDS
from unstir.nets import MLP
from unstir.parametrization import Denoiser
from unstir.processes import PROCESSES, make_process
from unstir.runs import load_run, load_tensors
from unstir.training import TrainConfig, train


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_grid_halves_into_every_other_point(name):
    p = make_process(name)
    for kind in GRIDS:
        for k in (1, 2, 3):
            fine, coarse = distill_grid(p, 4 * k, kind), distill_grid(p, k, kind)
            assert len(coarse) == k + 1 and coarse[0] == p.T and coarse[-1] == 0
            torch.testing.assert_close(fine[::4], coarse, rtol=1e-12, atol=1e-12)
            assert (torch.diff(fine) < 0).all()


def test_teacher_steps_and_rounds():
    assert [default_teacher_steps(k) for k in (1, 2, 3, 4, 5, 64)] == [64, 64, 96, 64, 80, 128]
    assert rounds(4, 64) == 4 and rounds(3, 96) == 5 and rounds(1, 2) == 1
    for k, n in ((4, 48), (4, 4), (3, 64), (2, 6)):
        with pytest.raises(ValueError, match=f"--teacher-steps {n} must be --nfe {k} times a power of two"):
            rounds(k, n)


@pytest.mark.parametrize("name", ["vp", "ve", "rf", "subvp"])
def test_target_is_the_x0_whose_one_step_lands_on_the_teachers_two(name):
    """Steps b-c of Algorithm 2: one DDIM step from z_t with the target x0 (and the eps it implies) reaches where
    the teacher's two DDIM steps do, computed here by ``sample`` over the three-point grid of each sample; on the
    last interval (t'' = 0) the target is the teacher's x0 at t'."""
    p = make_process(name)
    mix = oracle.unequal_2d()
    teacher = mix.denoiser(p)
    grid = distill_grid(p, 8, "log_snr")
    g = torch.Generator().manual_seed(0)
    i = torch.arange(4).repeat(4)
    t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    z = p.perturb(mix.sample(16, g), t, torch.randn(16, 2, generator=g, dtype=torch.float64))
    target = progressive_target(teacher, z, t, t_mid, t_next)
    for j in range(16):
        two = sample(teacher, x_T=z[j:j + 1], sampler="ddim", grid=torch.stack([t[j], t_mid[j], t_next[j]]),
                     dtype=torch.float64).x[0]
        if t_next[j] == 0:
            one = target[j]
        else:
            ct, cs = p.coefficients(t[j]), p.coefficients(t_next[j])
            one = cs.alpha * target[j] + cs.sigma * (z[j] - ct.alpha * target[j]) / ct.sigma
        torch.testing.assert_close(one, two, rtol=0, atol=1e-9)


def _exact_student(process_name, prediction, n, k, first, later, seed=0):
    """Progressive distillation with the exact oracle as the first teacher (a loop over ``progressive_loss``, as
    ``unstir.training`` runs it): a 2-D MLP student from scratch in the first round, then halvings."""
    mix, p = oracle.unequal_2d(), make_process(process_name)
    exact = mix.denoiser(p)
    torch.manual_seed(seed)
    make = lambda: MLP(2, 128, 3, 1000.0 / p.T)  # noqa: E731
    net = make()
    student, teacher = Denoiser(net, p, prediction), exact
    g = torch.Generator().manual_seed(seed + 1)
    while n > k:
        steps, peak = (first, 1e-3) if teacher is exact else (later, 5e-4)
        grid, opt, ema = distill_grid(p, n, "log_snr"), torch.optim.AdamW(net.parameters()), make()
        ema.load_state_dict(net.state_dict())
        for s in range(steps):
            opt.param_groups[0]["lr"] = peak * min(1, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
            loss = progressive_loss(student, teacher, mix.sample(256, g).float(), torch.randint(n // 2, (256,), generator=g),
                                    grid, torch.randn(256, 2, generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for a, b in zip(ema.parameters(), net.parameters()):
                    a.lerp_(b, 1 - min(0.99, (1 + s) / (10 + s)))
        net.load_state_dict(ema.state_dict())
        frozen = make().requires_grad_(False)
        frozen.load_state_dict(net.state_dict())
        teacher, n = Denoiser(frozen, p, prediction), n // 2
    return mix, p, exact, student


@pytest.mark.parametrize("process_name,prediction", [("rf", "velocity"), ("vp", "v")])
def test_student_of_the_exact_oracle_matches_the_exact_map(process_name, prediction):
    """The teacher's probability-flow map is known exactly here (RK45 on the oracle at 1e-7). A 2-step student
    distilled from 16 DDIM steps of the exact score must (a) reproduce the 16-step teacher to 0.1 in mean endpoint
    distance (the data spread about 1.2 per coordinate; an untrained network is ~1 away), so that (b) its distance
    to the exact map is the teacher's own discretisation error within the same 0.1, and (c) below half of what 2
    DDIM steps of the exact score reach. Measured: rf 0.15 against the teacher's 0.13 and DDIM-2's 0.77."""
    mix, p, exact, student = _exact_student(process_name, prediction, 16, 2, first=800, later=250)
    x_T = p.prior_sample((2000, 2), torch.Generator().manual_seed(123), dtype=torch.float64)
    with torch.no_grad():
        truth = sample(exact, x_T=x_T, sampler="ode_rk45", rtol=1e-7, atol=1e-7).x
        taught = sample(exact, x_T=x_T, sampler="ddim", grid=distill_grid(p, 16)).x
        two = sample(exact, x_T=x_T, sampler="ddim", grid=distill_grid(p, 2)).x
        got = sample(student, x_T=x_T.float(), sampler="ddim", grid=distill_grid(p, 2)).x.double()
    dist = lambda a, b: (a - b).norm(dim=1).mean().item()  # noqa: E731
    print(f"{process_name}: student-exact {dist(got, truth):.4f}, student-teacher {dist(got, taught):.4f}, "
          f"teacher-exact {dist(taught, truth):.4f}, ddim2-exact {dist(two, truth):.4f}")
    assert dist(got, taught) < 0.1
    assert dist(got, truth) < dist(taught, truth) + 0.1
    assert dist(got, truth) < 0.5 * dist(two, truth)


# --- the verb: a run like any other -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    train(TrainConfig(data="moons", process="rf", prediction="velocity", steps=600, n_data=4000, width=64,
                      checkpoint_every=600, log_every=600), run, progress=False)
    return run


def test_distilled_run_samples_in_two_steps_like_its_teacher_in_sixteen(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--run", str(teacher), "--nfe", "2", "--teacher-steps", "16", "--steps", "300",
                 "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["distill"] == {"teacher": str(teacher), "nfe": 2, "teacher_steps": 16, "grid": "log_snr"}
    t_model, s_model = load_run(teacher), load_run(out)
    p = t_model.process
    x_T = p.prior_sample((2000, 2), torch.Generator().manual_seed(7))
    with torch.no_grad():
        taught = sample(t_model, x_T=x_T, sampler="ddim", grid=distill_grid(p, 16)).x
        two = sample(t_model, x_T=x_T, sampler="ddim", grid=distill_grid(p, 2)).x
        got = sample(s_model, x_T=x_T, sampler="ddim", grid=sample_grid(p, info["config"]["distill"])).x
    dist = lambda a, b: (a - b).norm(dim=1).mean().item()  # noqa: E731
    print(f"student-teacher16 {dist(got, taught):.4f}, teacher ddim2-teacher16 {dist(two, taught):.4f}")
    assert dist(got, taught) < 0.25 * dist(two, taught)
    # `unstir sample` on the student: DDIM on its grid, two evaluations, by default
    capsys.readouterr()
    assert main(["sample", "--run", str(out), "-n", "64", "--out", str(tmp_path / "s.npy"), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "distilled run: ddim" in said.err and "with ddim (2 model evaluations)" in said.out
    # --eta (and --sampler ddim) keep the student's grid: its DDIM with fresh noise, the same two evaluations
    assert main(["sample", "--run", str(out), "-n", "64", "--sampler", "ddim", "--eta", "1", "--out",
                 str(tmp_path / "noisy.npy"), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "distilled run: ddim" in said.err and "eta 1;" in said.err and "(2 model evaluations)" in said.out
    plain, noisy = np.load(tmp_path / "s.npy"), np.load(tmp_path / "noisy.npy")
    assert plain.shape == noisy.shape and np.abs(plain - noisy).mean() > 0.01  # the noise reached the samples
    assert main(["sample", "--run", str(out), "-n", "8", "--steps", "4", "--out", str(tmp_path / "s4.npy"),
                 "--quiet"]) == 0  # another step count: the named grid of the default sampler, no notice
    said = capsys.readouterr()
    assert "distilled run" not in said.err and "with dpm++2m (4 model evaluations)" in said.out
    assert main(["encode", "--run", str(out), "-n", "16", "--out", str(tmp_path / "z.npy"), "--quiet"]) == 0
    assert "is distilled to 2 DDIM step(s)" in capsys.readouterr().err


def test_killed_distillation_resumes_exactly(teacher, tmp_path):
    """Interrupted inside the second of three rounds (the checkpoint at 150 carries the round's teacher), resumed:
    the same weights, bit for bit, as an uninterrupted distillation."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    kw = dict(nfe=2, teacher_steps=16, steps=240, checkpoint_every=50, progress=False)
    distill(teacher, whole, **kw)
    distill(teacher, cut, stop_after=170, **kw)
    assert json.loads((cut / "checkpoint.json").read_text())["step"] == 150
    assert any(k.startswith("teacher.") for k in load_tensors(next(cut.glob("checkpoint-*.safetensors"))))
    with pytest.raises(ValueError, match=r"cannot change --nfe 4 \(the run has 2\)"):
        distill(None, cut, nfe=4, resume=True, progress=False)
    moved = teacher.with_name("teacher-moved")  # the checkpoint carries the round's teacher: the run is not read
    teacher.rename(moved)
    try:
        distill(teacher, cut, nfe=2, resume=True, progress=False)  # the recorded settings, given again, are fine
    finally:
        moved.rename(teacher)
    a = load_tensors(whole / "checkpoint-240.safetensors")
    b = load_tensors(cut / "checkpoint-240.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_input_is_refused_before_anything_is_written(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "run.json").write_text((teacher / "run.json").read_text())
    cases = [
        (["--run", str(tmp_path / "empty"), "--nfe", "2"], "holds no trained run to distil"),
        (["--run", str(tmp_path / "untrained"), "--nfe", "2"], "has not reached its first checkpoint"),
        (["--run", str(teacher), "--nfe", "3", "--teacher-steps", "64"], "must be --nfe 3 times a power of two"),
        (["--run", str(teacher), "--nfe", "0"], "--nfe must be an integer >= 1"),
        (["--run", str(teacher), "--nfe", "2", "--steps", "2", "--teacher-steps", "16"], "fewer than the 3 rounds"),
        (["--run", str(teacher), "--nfe", "2", "--grid", "nope"], "invalid choice"),
        (["--nfe", "2"], "needs --run (the teacher) and --nfe"),
    ]
    for args, message in cases:
        if "--grid" in args:  # argparse's own refusal
            with pytest.raises(SystemExit):
                main(["distill", *args, "--out", str(out)])
        else:
            assert main(["distill", *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_teachers_it_cannot_distil(tmp_path, capsys):
    discrete = tmp_path / "discrete"
    train(TrainConfig(data="moons", process="ddpm", discrete=True, steps=20, width=16, depth=1, n_data=500,
                      checkpoint_every=20), discrete, progress=False)
    with pytest.raises(ValueError, match="between DDPM's integer timesteps"):
        distill(discrete, tmp_path / "s1", nfe=2, progress=False)
    assert not (tmp_path / "s1").exists()
    student = tmp_path / "s2"
    continuous = tmp_path / "cont"
    train(TrainConfig(data="moons", steps=20, width=16, depth=1, n_data=500, checkpoint_every=20), continuous,
          progress=False)
    distill(continuous, student, nfe=4, teacher_steps=8, steps=2, progress=False)
    with pytest.raises(ValueError, match="is itself distilled"):
        distill(student, tmp_path / "s3", nfe=2, progress=False)


def test_each_round_warms_up_and_decays_on_its_own():
    """The learning rate of a distillation restarts in every round: a linear warm-up over a tenth of the round
    (at most the configured warm-up), then a cosine to 0 at the round's last step."""
    from unstir.training import _lr

    cfg = TrainConfig(steps=300, lr=1e-3, warmup=200, distill={"teacher": "t", "nfe": 2, "teacher_steps": 16,
                                                               "grid": "log_snr"})
    for begin in (0, 100, 200):  # three rounds of 100 steps
        assert _lr(cfg, begin) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
        assert _lr(cfg, begin + 9) == pytest.approx(1e-3)
        assert _lr(cfg, begin + 99) < 1e-6
        assert _lr(cfg, begin + 55) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_an_image_student_trains_without_dropout_at_a_quarter_of_the_rate(tmp_path):
    """The paper's released configuration: the student is the teacher's network with dropout 0, at a quarter of
    the teacher's learning rate (CIFAR-10: 2e-4 -> 5e-5). Dropout has no weights, so the teacher's load into
    it; any other difference of network is refused."""
    from unstir.distill import distill

    teacher = tmp_path / "t"
    train(TrainConfig(data="digits", steps=2, batch_size=8, n_data=64, widths=(8, 16), dropout=0.2, lr=1e-3,
                      checkpoint_every=2), teacher, progress=False)
    distill(teacher, tmp_path / "s", nfe=2, teacher_steps=4, steps=2, checkpoint_every=2, progress=False)
    config = json.loads((tmp_path / "s" / "run.json").read_text())["config"]
    assert config["dropout"] == 0.0 and config["lr"] == pytest.approx(2.5e-4)
    student = load_run(tmp_path / "s")
    assert not any(isinstance(m, torch.nn.Dropout) for m in student.net.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in load_run(teacher).net.modules())
