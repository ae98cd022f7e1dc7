"""Figures (matplotlib, written to PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _host(x: torch.Tensor) -> torch.Tensor:
    """A tensor from any device, on the CPU for drawing."""
    return x.detach().cpu()


def marginals_and_scores(mixture, process, times, path: Path, lim: float = 3.0, res: int = 120) -> None:
    """log p_t as an image with the exact score field as arrows, one panel per t."""
    mixture = mixture.to("cpu")
    fig, axes = plt.subplots(1, len(times), figsize=(3.6 * len(times), 3.4))
    u = torch.linspace(-lim, lim, res, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).reshape(-1, 2)
    q = torch.linspace(-lim, lim, 17, dtype=torch.float64)
    qgrid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)
    for ax, t in zip(axes, times):
        logp = mixture.marginal_log_prob(grid, t, process).reshape(res, res)
        shown = ax.imshow(logp.clamp_min(logp.max() - 12).numpy(), extent=(-lim, lim, -lim, lim), origin="lower",
                          cmap="magma")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        score = mixture.score(qgrid, t, process)
        score = score / score.norm(dim=1, keepdim=True).clamp_min(1e-12) ** 0.5  # compress the range
        ax.quiver(qgrid[:, 0], qgrid[:, 1], score[:, 0], score[:, 1], color="white", alpha=0.7, width=0.004)
        ax.set_title(f"t = {t:.3g}   sigma = {process.sigma(t).item():.2f}", fontsize=9)
        ax.set_xlabel("x[0]", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("x[1]", fontsize=8)
    fig.suptitle(f"{process.name}: log p_t (colour, clipped 12 nats below its peak) and the exact score "
                 f"(arrows, length compressed)", y=1.0, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def plot_limits(panels: dict[str, torch.Tensor], share: float = 0.999) -> tuple[tuple[float, float], ...]:
    """(xlim, ylim) that hold the central ``share`` of every panel's points on each axis (all panels
    together, so samples and data are drawn on the same scale), padded by 5%."""
    pts = torch.cat([x[:, :2].double() for x in panels.values()])
    pts = pts[torch.isfinite(pts).all(1)]
    q = torch.quantile(pts, torch.tensor([(1 - share) / 2, (1 + share) / 2], dtype=torch.float64), dim=0)
    pad = 0.05 * (q[1] - q[0]).clamp_min(1e-6)
    return tuple((float(q[0, i] - pad[i]), float(q[1, i] + pad[i])) for i in range(2))


def scatter_panels(panels: dict[str, torch.Tensor], path: Path, xlim=None, ylim=None, ncol: int | None = None) -> None:
    """One scatter plot per named 2-D sample, all on the same axes limits (from the data unless given),
    ``ncol`` panels per row (default: one row)."""
    panels = {k: _host(v) for k, v in panels.items()}
    auto_x, auto_y = plot_limits(panels)
    xlim, ylim = xlim or auto_x, ylim or auto_y
    ncol = ncol or len(panels)
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol, 3.0 * nrow), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.5, alpha=0.5)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7, length=2, pad=1)
    fig.tight_layout(pad=0.4, w_pad=0.6, h_pad=0.6)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.03)
    plt.close(fig)


def trajectories(paths: dict[str, tuple[list[float], torch.Tensor]], path: Path) -> None:
    """First coordinate against t for a few paths per sampler, drawn from the same noise."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, (ts, xs)), color in zip(paths.items(), colors):
        for j in range(xs.shape[1]):
            ax.plot(ts, _host(xs)[:, j, 0].numpy(), color=color, lw=1, alpha=0.8, label=label if j == 0 else None)
    ax.invert_xaxis()
    ax.set_xlabel("t (reverse time runs left to right)")
    ax.set_ylabel("x[0]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interpolation_path(data: torch.Tensor, frames: torch.Tensor, path: Path) -> None:
    """Decoded interpolation frames (2-D) as a path over the data."""
    data, frames = _host(data), _host(frames)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=1.5, alpha=0.3, color="gray", label="data")
    ax.plot(frames[:, 0].numpy(), frames[:, 1].numpy(), "-o", color="C3", ms=4, lw=1.2, label="decoded frames")
    ax.scatter(frames[[0, -1], 0].numpy(), frames[[0, -1], 1].numpy(), s=60, color="C3", marker="*", zorder=3)
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def label_counts(ax, counts) -> None:
    """Label a log x axis at the given counts only (evaluation counts): its default labels crowd the minor
    ticks between them."""
    import matplotlib.ticker as ticker

    ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(set(counts))))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis="x", labelsize=8)


def conditioned_samples(data: torch.Tensor, samples: torch.Tensor, path: Path, title: str) -> None:
    """Posterior samples of 2-D data (the first two coordinates) over the data, with axes."""
    data, samples = _host(data), _host(samples)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=1.5, alpha=0.3, color="gray", label="data")
    ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=14 if len(samples) < 100 else 3, color="C3",
               label="conditioned samples")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images_uint8: torch.Tensor, path: Path, ncol: int | None = None) -> None:
    """Save (N, C, H, W) uint8 images as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    images_uint8 = _host(images_uint8)
    n, c, h, w = images_uint8.shape
    ncol = ncol or int(n**0.5 + 0.999)
    nrow = (n + ncol - 1) // ncol
    canvas = torch.zeros(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images_uint8[i]
    arr = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    # Every image at least TILE_PIXELS across (8x8 digits x4), or the whole grid 256 wide, within MAX_GRID_WIDTH.
    scale = max(1, -(-TILE_PIXELS // max(h, w)), 256 // img.width)
    scale = max(1, min(scale, MAX_GRID_WIDTH // img.width))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, format="PNG")


TILE_PIXELS = 32  # image_grid draws each image at least this wide (nearest-neighbour)
MAX_GRID_WIDTH = 4096


def labelled_strip(images_uint8: torch.Tensor, labels: list[str], path: Path) -> None:
    """(N, C, H, W) uint8 images in one row, each titled (e.g. "truth", "measurement", "sample 1"), drawn with
    nearest-neighbour pixels."""
    images_uint8 = _host(images_uint8)
    n = images_uint8.shape[0]
    if len(labels) != n:
        raise ValueError(f"need one label per image, got {len(labels)} for {n}")
    fig, axes = plt.subplots(1, n, figsize=(1.1 * n, 1.35), squeeze=False)
    for ax, image, label in zip(axes[0], images_uint8, labels):
        ax.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(),
                  cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.tight_layout(pad=0.2, w_pad=0.2)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.02)
    plt.close(fig)
