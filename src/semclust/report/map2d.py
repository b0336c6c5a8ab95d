"""The 2-D map: a sample of embeddings projected to the plane, drawn as a PNG with Pillow."""

from __future__ import annotations

import colorsys
import importlib.util
import io
import logging

import numpy as np

log = logging.getLogger(__name__)

_GOLDEN_FRACTION = 0.618033988749895
_BACKGROUND = (255, 255, 255)
_MARGIN = 24


def cluster_color(cluster: int) -> tuple[int, int, int]:
    """A stable colour per cluster id; neighbouring ids get far-apart hues (golden-ratio steps)."""
    hue = (cluster * _GOLDEN_FRACTION) % 1.0
    # Alternate saturation/lightness a little so that hues that do come close stay apart.
    light = (0.42, 0.55, 0.35)[cluster % 3]
    sat = (0.75, 0.9, 0.6)[(cluster // 3) % 3]
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return round(r * 255), round(g * 255), round(b * 255)


def color_hex(cluster: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*cluster_color(cluster))


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def project_2d(vectors: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """Coordinates float32 (n, 2) of float32 (n, D) rows, and the method used.

    ``auto`` is UMAP when ``umap-learn`` is installed, PCA otherwise; ``umap`` without the package
    is an error, not a silent PCA.
    """
    if method not in ("auto", "pca", "umap"):
        raise ValueError(f"projection={method!r} is not allowed; choose one of auto, pca, umap")
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 2), np.float32), "none"
    use_umap = method == "umap" or (method == "auto" and umap_available())
    if method == "umap" and not umap_available():
        raise ValueError("projection=umap needs the umap-learn package: pip install umap-learn")
    if use_umap and n > 3:
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1))
        return np.asarray(reducer.fit_transform(vectors), dtype=np.float32), "UMAP"
    return pca_2d(vectors, seed), "PCA"


def pca_2d(vectors: np.ndarray, seed: int = 0, iterations: int = 8) -> np.ndarray:
    """Projection float32 (n, 2) of (n, D) rows on their two main principal axes.

    Seeded randomized subspace iteration (Halko et al.) with NumPy alone: a full SVD or
    eigendecomposition of a 5,000 x 1,280 sample takes seconds to minutes on a small machine, and
    importing scikit-learn's PCA costs seconds too; this takes milliseconds. Each axis' sign is
    fixed (largest loading positive) so that the map looks the same on every run.
    """
    x = np.asarray(vectors, dtype=np.float64)
    n, dim = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    if n < 2 or dim < 1:
        return out
    x = x - x.mean(axis=0)
    width = min(dim, n, 10)  # 2 axes + oversampling
    q = np.random.default_rng(seed).standard_normal((dim, width))
    for _ in range(iterations):
        q, _ = np.linalg.qr(x.T @ (x @ q))
    # The exact PCA of x restricted to the subspace spanned by q.
    _, s, vt = np.linalg.svd(x @ q, full_matrices=False)
    axes = q @ vt.T
    for j in range(min(2, axes.shape[1])):
        if s[j] <= 1e-9 * max(s[0], 1e-300):
            continue  # no variance along this axis: leave it at 0
        axis = axes[:, j] / np.linalg.norm(axes[:, j])
        axis *= np.sign(axis[np.argmax(np.abs(axis))])
        out[:, j] = x @ axis
    return out


def _to_pixels(coords: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale coordinates into the canvas, same scale on both axes (distances keep their look)."""
    lo = coords.min(axis=0)
    span = np.maximum(coords.max(axis=0) - lo, 1e-9)
    scale = min((width - 2 * _MARGIN) / span[0], (height - 2 * _MARGIN) / span[1])
    offset = (np.array([width, height]) - span * scale) / 2
    xy = (coords - lo) * scale + offset
    xy[:, 1] = height - xy[:, 1]  # image rows grow downwards
    return xy


def render_map(
    coords: np.ndarray,
    clusters: np.ndarray,
    labelled: list[int],
    width: int = 1100,
    height: int = 760,
    radius: float = 2.5,
) -> tuple[bytes, dict[int, tuple[float, float]]]:
    """PNG bytes of a scatter of (n, 2) ``coords`` coloured by ``clusters`` (n,).

    The ids of the clusters in ``labelled`` are written at the median of their points. Also
    returns those label positions as fractions of the width and height, for the HTML.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img, "RGBA")
    positions: dict[int, tuple[float, float]] = {}
    if len(coords):
        xy = _to_pixels(np.asarray(coords, dtype=np.float64), width, height)
        # Draw in a seeded shuffled order so that no cluster always ends up on top.
        order = np.random.default_rng(0).permutation(len(xy))
        for i in order:
            x, y = xy[i]
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius),
                fill=(*cluster_color(int(clusters[i])), 200),
            )
        font = ImageFont.load_default(size=14)
        for c in labelled:
            pts = xy[clusters == c]
            if not len(pts):
                continue
            x, y = np.median(pts, axis=0)
            text = str(c)
            box = draw.textbbox((x, y), text, font=font, anchor="mm")
            pad = 3
            draw.rectangle(
                (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad),
                fill=(255, 255, 255, 210),
                outline=(*cluster_color(c), 255),
            )
            draw.text((x, y), text, fill=(20, 20, 20), font=font, anchor="mm")
            positions[c] = (float(x) / width, float(y) / height)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue(), positions
