"""A run's report: one self-contained HTML page (figures inlined as PNG) that shows what the model does.

Sections, each only when the run supports it (the page never shows a placeholder): the held-out data
beside each sampler's samples with NFE and sliced-W2 (or image grids); reverse-SDE and PF-ODE paths from the
same noise; sample quality against NFE for the deterministic samplers, measured on the run's own model;
the training loss; bits/dim of held-out data; an interpolation; an encode/decode round trip; guided samples
(class-conditional runs); an inpainting example.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import data as data_mod
from . import figures
from .figures import plt
from .inverse import Measurement, pigdm
from .metrics import sliced_w2, two_sample_floor
from .quality import bootstrap, overlap
from .runs import atomic_write, check_not_locked, load_run, read_log, run_lock
from .tuning import GRID_LOCK_WAIT
from .samplers import sample

REPORT_RESAMPLES = 100  # half-samples behind each interval of the samples table
SAMPLERS_SHOWN = {"ddpm": 50, "ddim": 20, "euler_maruyama": 50, "pc": 25, "dpm++2m": 20, "unipc": 20}
NFE_CURVE = ("ddim", "ode_heun", "dpm++2m", "unipc", "deis", "ipndm")


def _png(draw) -> str:
    """Run ``draw(path)`` into memory and return the PNG as a data URI."""
    buf = io.BytesIO()
    draw(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(fig) -> str:
    uri = _png(lambda buf: fig.savefig(buf, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return uri


def _images(x: torch.Tensor, ncol: int | None = None, min_side: int = 40) -> str:
    """Images as one PNG grid, small images enlarged (nearest) to at least ``min_side`` pixels a side."""
    k = max(1, -(-min_side // x.shape[-1]))
    x = x.repeat_interleave(k, -1).repeat_interleave(k, -2)
    return _png(lambda buf: figures.image_grid(data_mod.from_unit_range(x.clamp(-1, 1).cpu().float()), buf, ncol))


class _Page:
    def __init__(self, title: str):
        self.title, self.parts = title, []

    def section(self, heading: str, text: str = "", image: str | None = None, table: list[list] | None = None):
        body = f"<h2>{html.escape(heading)}</h2>"
        if text:
            body += f"<p>{html.escape(text)}</p>"
        if table:
            head, *rows = table
            body += "<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"
            body += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            body += "</table>"
        if image:
            body += f'<img src="{image}" alt="{html.escape(heading)}">'
        self.parts.append(f"<section>{body}</section>")

    def render(self) -> str:
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "img{max-width:100%;image-rendering:pixelated;display:block;margin:.5em 0}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
                 "section{margin-bottom:2em}")
        # The script marks the page once every image has decoded (the rendering test reads it).
        script = ("window.addEventListener('load',()=>{const ok=[...document.images].every("
                  "i=>i.complete&&i.naturalWidth>0);document.body.dataset.images=ok?'ok':'broken';});")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style><script>{script}</script></head><body><h1>{html.escape(self.title)}</h1>"
                + "".join(self.parts) + "</body></html>\n")


def write_report(run, out=None, *, n: int = 1000, seed: int = 0, progress: bool = True, device="cpu") -> Path:
    """Write ``run/report.html`` (or ``out``) for the run folder ``run``, computing on ``device``; returns its
    path."""
    run = Path(run)
    model = load_run(run, device=device)
    if out is None or Path(out).resolve().parent == run.resolve():
        check_not_locked(run, "report")  # a run that trains now: refused before the work, not after it
    log = read_log(run)  # a damaged log is named before the work
    info = model.run_info
    cfg = info["config"]
    is_image = len(model.data_shape) == 3
    held, levels = _held_out(cfg, model, n, seed)
    held = held.to(device)
    g = lambda k: torch.Generator().manual_seed(seed + k)  # noqa: E731
    # A run made by `unstir demo` lives in OUT/run: name it by its parent too.
    name = f"{run.resolve().parent.name}/{run.name}" if run.name == "run" else run.name
    page = _Page(f"unstir: {name} ({cfg['data']}, {model.process.name}, {cfg['prediction']} prediction)")
    steps_done = json.loads((run / "checkpoint.json").read_text())["step"]
    page.section("Run", table=[["setting", "value"], ["data", cfg["data"]], ["data shape", str(model.data_shape)],
                               ["process", repr(model.process)], ["prediction", cfg["prediction"]],
                               ["weighting", cfg["weighting"]], ["trained steps", steps_done],
                               ["parameters", sum(p.numel() for p in model.net.parameters())]])
    bar = tqdm(total=9, desc="report", disable=not progress, unit="section")
    tic = time.perf_counter()

    # 1. samples ------------------------------------------------------------------------------
    shape = (min(n, 64) if is_image else n, *model.data_shape)
    x_T = model.process.prior_sample(shape, g(1), device=device)
    results = {}
    with torch.no_grad():
        distilled = cfg.get("distill")
        if distilled:  # the student's own sampler first: DDIM on the grid it was distilled for (unstir.distill)
            from .distill import sample_grid

            results["distilled ddim"] = sample(model, None, x_T, sampler="ddim", grid=sample_grid(model.process,
                                                                                                    distilled))
        for name, steps in SAMPLERS_SHOWN.items():
            results[name] = sample(model, None, x_T, sampler=name, steps=steps, generator=g(2))
    if is_image:
        grid = torch.cat([held[:8]] + [r.x[:8] for r in results.values()])
        page.section("Samples", "Rows: held-out data, then " + ", ".join(f"{k} ({r.nfe} NFE)" for k, r in
                                                                          results.items()) + ".",
                     _images(grid, 8))
    else:
        draws = [_held_out(cfg, model, n, seed + 50 + i)[0] for i in range(5)]
        floors = two_sample_floor(lambda i: draws[i], held)
        # 95 % intervals by half-sampling (unstir.quality.bootstrap); a sampler whose interval overlaps the floor's
        # (the first fresh draw's) cannot be told from the true data at this n.
        interval = lambda x: bootstrap(sliced_w2, held, x, resamples=REPORT_RESAMPLES, seed=seed,
                                         bounds=(0.0, float("inf")))  # noqa: E731
        floor_iv = interval(draws[0])
        rows = [["sampler", "NFE", "sliced-W2", "95 % interval", "overlaps the floor's"]]
        for k, r in results.items():
            iv = interval(r.x)
            rows.append([k, r.nfe, f"{iv[0]:.4f}", f"{iv[1]:.4f}-{iv[2]:.4f}", "yes" if overlap(iv, floor_iv) else "no"])
        rows.append([f"(two-sample floor: {len(floors)} fresh draws of the true data against the same held-out "
                     f"points, range {min(floors):.4f}-{max(floors):.4f})", "", f"{sum(floors) / len(floors):.4f}",
                     f"{floor_iv[1]:.4f}-{floor_iv[2]:.4f} (first draw)", ""])
        panels = {"held-out data": held} | {f"{k} ({r.nfe} NFE)": r.x for k, r in results.items()}
        page.section("Samples", f"{n} samples per sampler against {n} held-out points. The floor is what a "
                     f"perfect sampler scores on average at this n; a sampler's score spreads around it as the "
                     f"floor's draws do, and the samplers here share one noise draw, so they can all land below "
                     f"it. Intervals: {REPORT_RESAMPLES} half-samples of both sets, about the estimate; overlapping "
                     f"intervals are not told apart at this n. Sliced-W2 shrinks as n grows: `unstir demo`'s table "
                     f"(2000 samples, other noise) is not comparable with this one (-n {n}).",
                     _png(lambda buf: figures.scatter_panels(panels, buf, ncol=4)), rows)
    bar.update()

    # 2. trajectories ---------------------------------------------------------------------------
    if not is_image:
        from .demos import _sde_and_ode_paths

        paths = _sde_and_ode_paths(model, x_T[:6], 20, seed)
        page.section("Trajectories", "Reverse SDE and probability-flow ODE from the same noise.",
                     _png(lambda buf: figures.trajectories(paths, buf)))
    else:
        rows = []
        for name in ("euler_maruyama", "dpm++2m"):
            seen = []
            with torch.no_grad():
                sample(model, None, x_T[:1], sampler=name, steps=10, generator=g(3),
                       callback=lambda s: seen.append(s["x"][0]))
            rows.append(torch.stack(seen[:10]))
        page.section("Trajectories", "The state along the way from the same noise: reverse SDE (top), PF ODE "
                     "(bottom).", _images(torch.cat(rows), 10))
    bar.update()

    # 3. quality against NFE ----------------------------------------------------------------------
    nfes = (4, 6, 10, 20, 40)
    probe = x_T[:128]
    with torch.no_grad():
        ref = sample(model, None, probe, sampler="ode_rk45", rtol=1e-5, atol=1e-5).x
        curves = {s: [(sample(model, None, probe, sampler=s, steps=k).x - ref).flatten(1).norm(dim=1).mean().item()
                      for k in nfes] for s in NFE_CURVE}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ticks = set()
    for s, errs in curves.items():
        cost = [k * (2 if s == "ode_heun" else 1) for k in nfes]
        ticks.update(cost)
        ax.loglog(cost, errs, "o-", label=s)
    figures.label_counts(ax, ticks)
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("distance to a tight PF-ODE solve")
    ax.legend(fontsize=8)
    page.section("Deterministic samplers against model evaluations",
                 "Mean distance of each sampler's output to the run's own PF ODE solved tightly (rtol 1e-5), on "
                 "128 shared noise draws.", _figure(fig))
    bar.update()

    # 4. loss ------------------------------------------------------------------------------------
    if log:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot([r["step"] for r in log], [r["loss"] for r in log])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        page.section("Training loss", f"{cfg['weighting']} weighting, from log.jsonl.", _figure(fig))
    bar.update()

    # 5. bits/dim -------------------------------------------------------------------------------
    from .likelihood import log_likelihood

    m = min(len(held), 100)
    with torch.no_grad():
        lk = log_likelihood(model, held[:m], levels=levels, rtol=1e-3, atol=1e-3, generator=g(4),
                            divergence="hutchinson" if is_image else "auto", probes=2)
    bpd, se = lk.mean()
    kind = f"dequantised with {levels} levels" if levels else "continuous data"
    page.section("Likelihood", f"{bpd:.3f} +- {se:.3f} bits/dim on {m} held-out samples ({kind}), by the PF ODE "
                 f"at rtol = atol = 1e-3, {lk.nfe} evaluations.")
    bar.update()

    # 6-7. interpolation and round trip -----------------------------------------------------------
    from .inversion import decode, encode, interpolate

    with torch.no_grad():
        inter = interpolate(model, held[0], held[1], frames=8, rtol=1e-4, atol=1e-4)
        enc = encode(model, held[:8], rtol=1e-5, atol=1e-5)
        dec = decode(model, enc.z, rtol=1e-5, atol=1e-5)
    rel = ((dec.x - held[:8]).flatten(1).norm(dim=1) / held[:8].flatten(1).norm(dim=1)).max().item()
    if is_image:
        page.section("Interpolation", "slerp between the latents of two held-out images, decoded.",
                     _images(inter.x, 8))
        page.section("Encode / decode", f"Rows: held-out data, latents / 3, decoded. Largest relative error {rel:.1e}.",
                     _images(torch.cat([held[:8], enc.z / 3, dec.x]), 8))
    else:
        page.section("Interpolation", "slerp between the latents of two held-out points, decoded (red).",
                     _png(lambda buf: figures.interpolation_path(held, inter.x, buf)))
        page.section("Encode / decode", f"8 held-out points to latents at T and back: largest relative error {rel:.1e} "
                     f"({enc.nfe} + {dec.nfe} evaluations).")
    bar.update()

    # 8. guided samples -----------------------------------------------------------------------
    if model.num_classes:
        from .guidance import cfg as cfg_guidance

        k = min(model.num_classes, 10)
        labels = torch.arange(k).repeat_interleave(8 if is_image else max(1, n // k))
        with torch.no_grad():
            rows = {s: sample(cfg_guidance(model, scale=s), None, (len(labels), *model.data_shape), y=labels,
                              generator=g(5)).x for s in (1.0, 3.0)}
        if is_image:
            page.section("Classifier-free guidance", "One row per class; scale 1 (the conditional model) then 3.",
                         _images(torch.cat([rows[1.0], rows[3.0]]), 8))
        else:
            panels = {f"class {c}, scale {s:g}": rows[s][labels == c] for s in rows for c in range(k)}
            page.section("Classifier-free guidance", "Each class at scale 1 (the conditional model) and 3.",
                         _png(lambda buf: figures.scatter_panels(panels, buf)))
    bar.update()

    # 9. inpainting --------------------------------------------------------------------------
    if is_image:
        mask = torch.zeros(model.data_shape, dtype=torch.long, device=held.device)
        mask[:, : model.data_shape[1] // 2] = 1
        rows = [held[:6]]
        outs = []
        for i in range(6):
            meas = Measurement(mask, held[i:i + 1].flatten(1)[:, mask.flatten().bool()][0], 0.0,
                               data_shape=model.data_shape)
            with torch.no_grad():
                outs.append(sample(pigdm(model, meas), None, x_T[i:i + 1], sampler="ddpm", steps=100,
                                   generator=g(6)).x)
        rows += [held[:6] * mask, torch.cat(outs)]
        page.section("Inpainting", "The lower half of held-out images restored (PiGDM, 100 DDPM steps). Rows: "
                     "truth, known half, restored.", _images(torch.cat(rows), 6))
    else:
        value = held[0, 0].item()
        meas = Measurement(torch.tensor([1] + [0] * (model.data_shape[0] - 1)), torch.tensor([value]), 0.0,
                           data_shape=model.data_shape)
        with torch.no_grad():
            cond = sample(model, None, x_T, sampler="ddpm", steps=100, project=meas.replacement(g(7)),
                          generator=g(8)).x
        page.section("Conditioning on a coordinate", f"Samples given x[0] = {value:.2f} (replacement, 100 DDPM "
                     f"steps, red) over the held-out data (grey).", _png(lambda buf: figures.conditioned_samples(
                         held, cond, buf, title=f"given x[0] = {value:.2f}")))
    bar.update()
    tuned = _tuned_rows(run)
    if tuned:
        page.section("Tuned time grids", "Grids fitted to this model by `unstir tune-grid` (stored in grids.json; "
                     "`unstir sample` uses them for the same sampler and NFE). Errors are mean distances to a "
                     "tight PF-ODE solve on the fitting batch.", table=tuned)
    bar.close()
    page.section("About this page", f"Written by `unstir report --run {run}` in {time.perf_counter() - tic:.0f} s.")
    path = Path(out) if out is not None else run / "report.html"
    inside = path.resolve().parent == run.resolve()
    with run_lock(run, "report", wait=GRID_LOCK_WAIT) if inside else contextlib.nullcontext():  # one writer per run
        atomic_write(path, lambda p: p.write_text(page.render()))
    return path


def _tuned_rows(run: Path) -> list[list]:
    """The table of grids stored by ``unstir tune-grid``, or [] when there are none."""
    from .tuning import GRIDS_FILE, _read_grids

    if not (run / GRIDS_FILE).exists():
        return []
    rows = [["sampler", "NFE", "best named grid", "its error", "tuned error", "times"]]
    for entry in _read_grids(run / GRIDS_FILE).values():
        rows.append([entry.get("sampler"), entry.get("nfe"), entry.get("start"), f"{entry.get('error_start', 0):.3g}",
                     f"{entry.get('error', 0):.3g}", " ".join(f"{t:.4g}" for t in entry.get("times", []))])
    return rows


def _held_out(cfg: dict, model, n: int, seed: int):
    spec = data_mod.held_out_name(cfg["data"])
    ds = data_mod.load(spec, n=n, size=cfg.get("size"), mode=cfg.get("mode", "L"), seed=seed + 1000)
    if tuple(ds.shape) != tuple(model.data_shape):
        raise ValueError(f"held-out data {spec!r} has shape {ds.shape}, the model {model.data_shape}")
    return ds.x[:n], ds.levels
