"""The analytical first step (AFS; Zhou et al. 2024) at equal NFE: each fixed-grid solver with and without
``afs=True`` (which replaces the evaluation at T by x_T / sigma_T and so buys one more grid step for the same
number of model evaluations). Exact scores of four Gaussian mixtures (2-D to 64-D) on vp; noise seed 2026
and mixtures of seeds 31 and 32, none used to choose anything (AFS is off by default). Error: mean distance
of the endpoint to the PF ODE solved at rtol 1e-9 from the same noise. Ratio < 1: AFS is better.

    .venv/bin/python benchmarks/afs.py
"""
import torch, unstir
from unstir import oracle
torch.set_num_threads(1)
p = unstir.make_process("vp")
cases = {"ring8": oracle.ring(), "unequal3": oracle.unequal_2d(), "mix8d": oracle.random_mixture(8, 4, seed=31),
         "mix64d": oracle.random_mixture(64, 4, seed=32)}
print(f"{'case':9s} {'sampler':8s} NFE  plain      afs     ratio")
for cname, gm in cases.items():
    m = gm.denoiser(p)
    x_T = p.prior_sample((500, gm.dim), torch.Generator().manual_seed(2026), dtype=torch.float64)
    ref = unstir.sample(m, p, x_T, sampler="ode_rk45", rtol=1e-9, atol=1e-9,
                        grid=torch.tensor([p.T, p.t_min, 0.0], dtype=torch.float64)).x
    for s in ("dpm++2m", "ipndm", "unipc"):
        for nfe in (4, 5, 6, 8):
            a = unstir.sample(m, p, x_T, sampler=s, steps=nfe)
            b = unstir.sample(m, p, x_T, sampler=s, steps=nfe + 1, afs=True)
            assert a.nfe == b.nfe == nfe
            ea = (a.x - ref).norm(dim=1).mean().item(); eb = (b.x - ref).norm(dim=1).mean().item()
            print(f"{cname:9s} {s:8s} {nfe:3d} {ea:9.3e} {eb:9.3e} {eb/ea:6.2f}", flush=True)
