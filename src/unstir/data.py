"""Data: 2-D toy sets, scikit-learn's digits, a folder of images, a .npy array.

Everything returns a ``Dataset`` of float32 tensors: vectors (N, d) or images (N, C, H, W) scaled to
[-1, 1]. Nothing is downloaded: the toy sets are generated and the digits ship with scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import functools
import math
import os

import numpy as np
import torch

from . import oracle
from ._checks import check_choice

Tensor = torch.Tensor

TOY_2D = ("moons", "swiss_roll", "circles", "checkerboard", "ring", "unequal_2d")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    """Training data: ``x`` (N, ...) in float32, optional integer ``labels``, and a name. ``levels`` is the
    number of evenly spaced values in [-1, 1] that quantised data take (256 for 8-bit images, 17 for the
    digits; None for continuous data): the likelihood dequantises with it."""

    name: str
    x: Tensor
    labels: Tensor | None = None
    levels: int | None = None

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


def toy_2d(name: str, n: int, seed: int = 0, *, return_labels: bool = False):
    """n independent draws from a 2-D toy distribution, roughly within [-3, 3]^2; with ``return_labels``
    also their class labels where the set has classes (moons and circles: which one; ring and unequal_2d:
    the mixture component), else None.

    scikit-learn's make_moons and make_circles place their points at evenly spaced angles (a
    stratified sample, so two sets of the same size sit far closer to each other than independent
    draws do: on moons, sliced-W2 0.013 against about 0.04). Here they come from a 16 times finer
    stratified set, drawn at random with replacement: independent draws up to a negligible angular
    rounding."""
    from sklearn import datasets

    check_choice("2-D data set", name, TOY_2D)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rs = np.random.RandomState(seed)
    fine = min(16 * n, max(n, 1_000_000))
    labels = None
    if name in ("moons", "circles"):
        if name == "moons":
            x, y = datasets.make_moons(fine, noise=0.05, random_state=rs)
            x = x * 1.5 - [0.75, 0.25]
        else:
            x, y = datasets.make_circles(fine, factor=0.5, noise=0.04, random_state=rs)
            x = x * 2.5
        pick = rs.randint(fine, size=n)
        x, labels = x[pick], torch.as_tensor(y[pick], dtype=torch.long)
    elif name == "swiss_roll":
        x = datasets.make_swiss_roll(n, noise=0.3, random_state=rs)[0][:, [0, 2]] / 5.0
    elif name == "checkerboard":
        cells = rs.randint(0, 8, size=n)  # the 8 dark squares of a 4x4 board
        row, col = cells // 2, 2 * (cells % 2) + (cells // 2) % 2
        x = np.stack([col + rs.rand(n), row + rs.rand(n)], 1) - 2.0
    else:
        x, labels = oracle.EXAMPLES[name]().sample(n, torch.Generator().manual_seed(seed), return_labels=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x, labels) if return_labels else x


def to_unit_range(x_uint8) -> Tensor:
    """8-bit values {0..255} -> [-1, 1] (bin centres are not used: 0 -> -1, 255 -> 1)."""
    return torch.as_tensor(x_uint8, dtype=torch.float32) / 127.5 - 1.0


def from_unit_range(x: Tensor) -> Tensor:
    """The exact inverse of ``to_unit_range`` on its image, rounded and clipped to uint8 elsewhere."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


DIGITS_TRAIN = 1500  # the first 1500 of scikit-learn's 1797 digits train; the last 297 are held out


def digits(split: str = "train") -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16, 17 levels) as (N, 1, 8, 8) in [-1, 1] with labels:
    'train' (the first 1500), 'test' (the held-out last 297) or 'all'."""
    from sklearn.datasets import load_digits

    check_choice("digits split", split, ("train", "test", "all"))
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.as_tensor(d.target, dtype=torch.long)
    part = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None), "all": slice(None)}[split]
    name = "digits" if split == "train" else f"digits-{split}"
    return Dataset(name, x[part], labels[part], levels=17)


SHAPES = ("circle", "square", "triangle")
COLOURS = ((230, 57, 70), (42, 157, 143), (233, 196, 106), (69, 123, 157), (244, 162, 97), (240, 240, 240))
SHAPES32_TEST_SEED = 1_000_003  # 'shapes32-test' draws from this seed; training sets use small seeds


def _shapes32_pixels(shape, colour, r, cx, cy) -> np.ndarray:
    """shapes32's 8-bit pixels (n, 3, 32, 32): each image's covered fraction of 4 x 4 subpixels times its colour,
    computed for each shape only on the images of that shape."""
    sub = 4
    grid = (np.arange(32 * sub) + 0.5) / sub
    X, Y = grid[None, None, :], grid[None, :, None]
    out = np.empty((len(shape), 3, 32, 32), dtype=np.uint8)
    for kind in range(len(SHAPES)):
        rows = np.flatnonzero(shape == kind)
        for i in range(0, len(rows), 256):
            k = rows[i:i + 256]
            c_x, c_y, rr = cx[k, None, None], cy[k, None, None], r[k, None, None]
            if kind == 0:
                mask = (X - c_x) ** 2 + (Y - c_y) ** 2 <= rr ** 2
            elif kind == 1:
                half = 0.8863 * rr  # square of area pi r^2: side r sqrt(pi)
                mask = (np.abs(X - c_x) <= half) & (np.abs(Y - c_y) <= half)
            else:
                h = 2.3329 * rr  # triangle of area pi r^2: side a = r sqrt(4 pi / sqrt 3), height sqrt(3)/2 a
                depth = Y - (c_y - 2 * h / 3)  # below the apex; the centroid sits 2h/3 below it
                mask = (depth >= 0) & (depth <= h) & (np.abs(X - c_x) <= depth / np.sqrt(3))
            cover = mask.reshape(-1, 32, sub, 32, sub).mean((2, 4))
            rgb = np.asarray(COLOURS, dtype=np.float64)[colour[k]]
            out[k] = np.rint(cover[:, None] * rgb[:, :, None, None]).astype(np.uint8)
    return out


def shapes32(n: int, seed: int = 0, *, return_factors: bool = False):
    """n procedural 32x32 RGB images, one filled shape each on black, every factor drawn from ``seed``:

    * shape: circle, square or equilateral triangle (pointing up), all of area pi r^2;
    * colour: one of 6 (``COLOURS``);
    * size: r uniform in [4, 9] pixels;
    * position: the centroid uniform where the whole shape stays 0.5 px inside the image.

    Edges are anti-aliased by 4 x 4 supersampling (a pixel's value is its covered fraction times the
    colour), then rounded to 8 bits (levels=256). Labels are 6 shape + colour (18 classes); with
    ``return_factors`` also a dict of the exact factors (shape, colour, r, cx, cy in pixels), from which a
    sample's validity can be measured. No download: the set is generated (issue 20)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    out, factors = _shapes32_arrays(n, seed)
    data = Dataset("shapes32", to_unit_range(torch.from_numpy(out.copy())),
                   torch.as_tensor(6 * factors["shape"] + factors["colour"]), 256)
    if return_factors:
        return data, {k: v.copy() for k, v in factors.items()}
    return data


@functools.lru_cache(maxsize=2)
def _shapes32_arrays(n: int, seed: int) -> tuple[np.ndarray, dict]:
    """shapes32's pixels and factors, kept for the last two (n, seed): a process that trains, samples and judges
    draws the same set several times (callers get copies)."""
    rng = np.random.default_rng(seed)
    shape, colour = rng.integers(0, len(SHAPES), n), rng.integers(0, len(COLOURS), n)
    r = rng.uniform(4.0, 9.0, n)
    reach = np.where(shape == 2, 1.5551 * r, np.where(shape == 1, 0.8863 * r, r)) + 0.5  # furthest extent
    cx, cy = (reach + rng.uniform(0, 1, (2, n)) * (32 - 2 * reach))
    return _shapes32_pixels(shape, colour, r, cx, cy), {"shape": shape, "colour": colour, "r": r, "cx": cx, "cy": cy}


# gratings32's factors: the wave vector (cycles across the 32 pixels in x and y: 0, 45, 90 and 135 degrees, each an
# exact bin of the 32 x 32 FFT) and the pair of colours the grating runs between.
GRATING_WAVES = ((4, 0), (3, 3), (0, 4), (3, -3))
GRATING_PALETTES = (((230, 57, 70), (42, 157, 143)), ((233, 196, 106), (69, 123, 157)), ((20, 20, 20), (240, 240, 240)))
GRATINGS32_TEST_SEED = 2_000_003  # 'gratings32-test' draws from this seed


def grating_basis(wave) -> np.ndarray:
    """The phase 2 pi (kx x + ky y) / 32 of a wave vector over the 32 x 32 pixel grid (x: column, y: row)."""
    y, x = np.mgrid[0:32, 0:32]
    return 2 * np.pi * (wave[0] * x + wave[1] * y) / 32


def gratings32(n: int, seed: int = 0, *, return_factors: bool = False):
    """n procedural 32x32 RGB sinusoidal gratings, every factor drawn from ``seed``:

    * orientation: one of the 4 wave vectors ``GRATING_WAVES`` (0, 45, 90, 135 degrees; periods 8 and 7.5 px);
    * palette: one of the 3 colour pairs ``GRATING_PALETTES`` (a, b);
    * phase: uniform in [0, 2 pi).

    pixel = a + (b - a) (1 + cos(phase(x, y) + phase)) / 2, rounded to 8 bits (levels=256). Labels are
    3 orientation + palette (12 classes). Every factor is readable without a network: on the integer grid the
    constant, cosine and sine of one wave vector are orthogonal, so ``unstir.quality.grating_fit`` recovers
    orientation, palette, contrast and phase by least squares in closed form. No download: the set is generated."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    wave, palette = rng.integers(0, len(GRATING_WAVES), n), rng.integers(0, len(GRATING_PALETTES), n)
    phase = rng.uniform(0, 2 * np.pi, n)
    basis = np.stack([grating_basis(w) for w in GRATING_WAVES])  # (4, 32, 32)
    s = (1 + np.cos(basis[wave] + phase[:, None, None])) / 2  # (n, 32, 32) in [0, 1]
    pal = np.asarray(GRATING_PALETTES, dtype=np.float64)[palette]  # (n, 2, 3)
    a, b = pal[:, 0, :, None, None], pal[:, 1, :, None, None]
    out = np.rint(a + (b - a) * s[:, None]).astype(np.uint8)
    data = Dataset("gratings32", to_unit_range(torch.from_numpy(out)), torch.as_tensor(3 * wave + palette), 256)
    if return_factors:
        return data, {"wave": wave, "palette": palette, "phase": phase}
    return data


PATCHES_SPLIT = 480  # of the photographs' 640 columns: training patches lie left of it, held-out ones right


def patches32(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """n natural 32x32 RGB patches cut from the two photographs scikit-learn ships in its wheel
    (``load_sample_images``: china.jpg and flower.jpg, 427 x 640), half at full resolution and half from the
    photographs halved (area-averaged), at positions, photographs and scales drawn from ``seed``. 'train'
    patches lie wholly in columns 0..479 and 'test' patches wholly in 480..639, so no held-out pixel was
    seen in training. Labels: the photograph (0 china, 1 flower). 8-bit (levels=256); no download."""
    from sklearn.datasets import load_sample_images

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    check_choice("patches32 split", split, ("train", "test"))
    photos = [torch.tensor(im).permute(2, 0, 1).float() for im in load_sample_images().images]
    scales = [[p for p in photos], [torch.nn.functional.avg_pool2d(p[None], 2)[0] for p in photos]]
    rng = np.random.default_rng(seed)
    photo, scale = rng.integers(0, 2, n), rng.integers(0, 2, n)
    out = torch.empty(n, 3, 32, 32)
    for i in range(n):
        img = scales[scale[i]][photo[i]]
        cut = PATCHES_SPLIT >> scale[i]
        lo, hi = (0, cut - 32) if split == "train" else (cut, img.shape[2] - 32)
        top, left = rng.integers(0, img.shape[1] - 32 + 1), rng.integers(lo, hi + 1)
        out[i] = img[:, top:top + 32, left:left + 32]
    name = "patches32" if split == "train" else "patches32-test"
    return Dataset(name, to_unit_range(out.round()), torch.as_tensor(photo), 256)


HELD_OUT = {"digits": "digits-test", "shapes32": "shapes32-test", "gratings32": "gratings32-test",
            "patches32": "patches32-test"}
IMAGE_SETS = ("digits", "digits-test", "shapes32", "shapes32-test", "gratings32", "gratings32-test", "patches32",
              "patches32-test")


def is_builtin(name: str) -> bool:
    return name in TOY_2D or name in IMAGE_SETS


def held_out_name(recorded: str) -> str:
    """The held-out set of a run's recorded data: a built-in set (a fresh draw, or its test split), never a path.
    A path in run.json could point anywhere (a run folder from elsewhere), so it is not followed: the user
    passes held-out data with --data."""
    if is_builtin(recorded):
        return HELD_OUT.get(recorded, recorded)
    raise ValueError(f"the run was trained on {recorded!r}, a path recorded in its run.json, which unstir does not "
                     f"follow; pass the held-out data with --data (a folder or .npy file)")


MAX_IMAGE_PIXELS = 4096 * 4096  # per image, checked from its header before it is decoded (a decompression bomb)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit (and 32-bit integer) grey images


def image_folder(path, size: int | None = None, mode: str = "L") -> Dataset:
    """Every PNG/JPEG under ``path`` as (N, C, H, W) in [-1, 1]; resized (shorter side) and centre-cropped
    to ``size`` if given, else all images must share one size. ``mode``: 'L' (grayscale) or 'RGB'.

    8-bit images are read as 256 levels. 16-bit grey PNGs are read at 16 bits (65536 levels; an RGB run repeats
    the grey channel), and a folder may not mix the two depths. PIL reads 16-bit colour PNGs as 8-bit RGB.
    An image above ``MAX_IMAGE_PIXELS`` is refused from its header, before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(root)!r} has no PNG or JPEG files")
    arrays, modes, depths = [], {}, {}
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
                im = Image.open(f)
            with im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"image {str(f)!r} is {im.width} x {im.height} = {im.width * im.height:,} pixels, "
                                     f"above unstir's limit of {MAX_IMAGE_PIXELS:,} (4096 x 4096); downscale it first")
                modes.setdefault(_colour(im), f.name)
                deep = im.mode in SIXTEEN_BIT
                depths.setdefault(16 if deep else 8, f.name)
                im = im.convert("F") if deep else im.convert(mode)  # 'F': 32-bit floats hold 16-bit levels exactly
                if size is not None:
                    scale = size / min(im.size)
                    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                                   Image.BICUBIC)
                    left, top = (im.width - size) // 2, (im.height - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                a = np.asarray(im, dtype=np.float32 if deep else np.uint8)
                if deep:
                    if a.min() < 0 or a.max() > 65535:
                        raise ValueError(f"image {str(f)!r} holds values in [{a.min():g}, {a.max():g}], beyond "
                                         f"16 bits; unstir reads 8-bit and 16-bit images")
                    a = np.stack([a] * 3, -1) if mode == "RGB" else a
                arrays.append(a)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {str(f)!r}: {getattr(err, 'strerror', None) or err}") from None
    if len(modes) > 1:
        raise ValueError(f"images in {str(root)!r} mix colour modes: " + ", ".join(f"{m} (e.g. {f})" for m, f in
                         sorted(modes.items())) + "; convert them to one mode (all grayscale or all colour) first")
    if len(depths) > 1:
        raise ValueError(f"images in {str(root)!r} mix bit depths: 8-bit (e.g. {depths[8]}) and 16-bit (e.g. "
                         f"{depths[16]}); convert them to one depth first")
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"images in {str(root)!r} have mixed sizes {sizes[:4]}; pass --size to resize them")
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    if 16 in depths:  # levels 0..65535 to [-1, 1], as .npy uint16 images are read
        x16 = torch.as_tensor(np.clip(np.round(x), 0, 65535) / 32767.5 - 1.0, dtype=torch.float32)
        return Dataset(root.name, x16, levels=65536)
    return Dataset(root.name, to_unit_range(x), levels=256)


def _colour(im) -> str:
    """'grayscale' or 'colour' for a PIL image (a palette image by its palette; alpha does not count)."""
    if im.mode == "P":
        return "colour" if (im.palette and im.palette.mode.startswith("RGB")) else "grayscale"
    return "grayscale" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "colour"


MAX_NPY_HEADER = 10000  # bytes; numpy.save writes headers of a few hundred, and numpy.load refuses above this too


def read_npy(path) -> np.ndarray:
    """A real-valued (integer or floating) array from a .npy file. Everything else is refused in one line before
    any data is read: text, pickled objects (unstir never unpickles), complex and boolean arrays, headers above
    ``MAX_NPY_HEADER`` bytes or that are not NumPy's dictionary, and a header whose shape claims more (or fewer)
    bytes than the file holds."""
    from numpy.lib import format as npy_format

    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError(f"{str(path)!r} is not a NumPy .npy file (it has no NumPy header); save arrays "
                                 f"with numpy.save")
            major = f.read(2)[:1]
            length = int.from_bytes(f.read(2 if major == b"\x01" else 4), "little")
            if major not in (b"\x01", b"\x02", b"\x03"):
                raise ValueError(f"{str(path)!r} has NumPy format version {major!r}, which unstir does not read "
                                 f"(1, 2 or 3)")
            if length > MAX_NPY_HEADER:
                raise ValueError(f"{str(path)!r} has a {length:,}-byte header, above the {MAX_NPY_HEADER:,} bytes "
                                 f"numpy.save writes; it is not an array unstir reads")
            f.seek(8)  # after the magic string and the version
            reader = npy_format.read_array_header_1_0 if major == b"\x01" else npy_format.read_array_header_2_0
            try:
                shape, fortran, dtype = reader(f, max_header_size=MAX_NPY_HEADER)
            except (ValueError, SyntaxError, TypeError):
                raise ValueError(f"{str(path)!r} has a damaged or foreign header (not the dictionary of dtype, order "
                                 f"and shape that numpy.save writes)") from None
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except OSError as err:
        raise ValueError(f"cannot read array {str(path)!r}: {err.strerror or err}") from err
    if dtype.hasobject:
        raise ValueError(f"{str(path)!r} holds Python objects, not numbers; unstir reads numeric arrays only")
    if dtype.kind not in "iuf":
        raise ValueError(f"array {str(path)!r} has dtype {dtype}; unstir reads real numbers (integers or floats): "
                         f"convert it first, e.g. a.astype(numpy.float32)"
                         + (" (and decide what the imaginary part means)" if dtype.kind == "c" else ""))
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != data_bytes:
        raise ValueError(f"the header of {str(path)!r} claims shape {shape} of {dtype} ({claimed:,} bytes), but the file "
                         f"holds {data_bytes:,} bytes after it; the file is damaged or truncated")
    from .resources import available_memory, gib

    free = available_memory("cpu")
    if free is not None and 2 * claimed > free:  # the array and its float32 copy
        raise ValueError(f"array {str(path)!r} is {gib(claimed)} ({shape} of {dtype}); with its float32 copy that is "
                         f"more than the {gib(free)} of memory free here")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read array {str(path)!r}: {err}") from None


def npy_array(path) -> Dataset:
    """A .npy array of vectors (N, d) or images (N, C, H, W) / (N, H, W).

    Vectors are used as given. Images: floats as given (they should lie in [-1, 1]); integers are levels,
    scaled to [-1, 1]: 0..255 (any integer dtype) as 8-bit, uint16 as 16-bit. Other integer ranges are
    refused: scale them to floats in [-1, 1] yourself."""
    path = Path(path)
    a = read_npy(path)
    if a.ndim not in (2, 3, 4) or a.shape[0] < 1:
        raise ValueError(f"array {str(path)!r} must have shape (N, d), (N, H, W) or (N, C, H, W); got {a.shape}")
    levels = None
    if a.ndim > 2 and np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if a.dtype == np.uint16 and hi > 255:
            x, levels = torch.as_tensor(a.astype(np.float64) / 32767.5 - 1.0, dtype=torch.float32), 65536
        elif 0 <= lo and hi <= 255:
            x, levels = to_unit_range(a.astype(np.uint8)), 256
        else:
            raise ValueError(f"integer images in {str(path)!r} hold values in [{lo}, {hi}] ({a.dtype}); unstir reads "
                             f"integer images as 8-bit levels 0..255 (or uint16); scale them to floats in [-1, 1]")
    else:
        x = torch.as_tensor(a, dtype=torch.float32)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
        raise ValueError(f"array {str(path)!r} contains NaN or inf (first in row {bad})")
    if x.ndim == 3:
        x = x[:, None]
    return Dataset(path.stem, x, levels=levels)


def load(spec: str, *, n: int = 20000, size: int | None = None, mode: str = "L", seed: int = 0) -> Dataset:
    """A data set by name ('moons', 'digits', 'digits-test', ...), folder of images, or .npy file."""
    if spec in TOY_2D:
        return Dataset(spec, *toy_2d(spec, n, seed, return_labels=True))
    if spec in ("digits", "digits-test"):
        return digits("train" if spec == "digits" else "test")
    if spec in ("shapes32", "shapes32-test"):
        data = shapes32(n, seed if spec == "shapes32" else SHAPES32_TEST_SEED + seed)
        data.name = spec
        return data
    if spec in ("gratings32", "gratings32-test"):
        data = gratings32(n, seed if spec == "gratings32" else GRATINGS32_TEST_SEED + seed)
        data.name = spec
        return data
    if spec in ("patches32", "patches32-test"):
        return patches32(n, seed, "train" if spec == "patches32" else "test")
    p = Path(spec)
    if p.suffix == ".npy":
        return npy_array(p)
    if p.is_dir():
        return image_folder(p, size, mode)
    raise ValueError(f"unknown data {spec!r}: use one of {list(TOY_2D) + list(IMAGE_SETS)}, "
                     f"a folder of images or a .npy file")

