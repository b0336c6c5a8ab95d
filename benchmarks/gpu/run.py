"""GPU check in one call: Keras ResNet50 on the JAX backend in bfloat16 under XLA against the
H200's bf16 roofline, JPEG decode on all cores, and FAISS k-means and a kNN graph on the GPU
when faiss can be imported. Prints one JSON object (stdout); progress goes to stderr.

Meant for a machine with one NVIDIA H200, 16 cores, PyTorch, JAX and CuPy but no TensorFlow,
FAISS, Ray or package registry: Keras comes from a carried copy (``--keras-path``, built by
``vendor.py``), semclust's decoder from this checkout's ``src/`` when it imports without the
heavy dependencies (it needs numpy, Pillow and yaml), plain Pillow otherwise. See README.md.

Roofline assumption: ResNet50 at 224 x 224 is about 4.1 G multiply-accumulates, 8.2 GFLOP, per
image; an H200 SXM does about 989 TFLOPS dense bf16; so at most about 120k images/s. The XLA
cost analysis of the compiled forward pass is reported next to it (``xla_gflop_per_image``).
Sections run in order (decode, embed, faiss); one that fails reports its error and the run goes
on; one that would start after ``--budget-s`` is skipped.

Tiny run on a CPU (checks the script, not the speed):

    KERAS_BACKEND=jax python benchmarks/gpu/run.py --images 64 --batch 16 --repeats 1 \
        --decode-images 64 --workers 2 --faiss-n 2000 --faiss-k 10 --faiss-cpu-ok
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESNET50_GFLOP_PER_IMAGE = 8.2  # 4.1 G multiply-accumulates at 224 px, 2 FLOP each
H200_DENSE_BF16_TFLOPS = 989.4
ROOFLINE_IMAGES_PER_S = H200_DENSE_BF16_TFLOPS * 1e3 / RESNET50_GFLOP_PER_IMAGE  # ~120.7k
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keras-path", help="directory with keras (vendor.py's output) for sys.path")
    ap.add_argument("--faiss-path", help="directory holding an importable faiss, for sys.path")
    ap.add_argument("--src", default=str(HERE.parents[1] / "src"), help="semclust's src/")
    ap.add_argument("--images", type=int, default=4096, help="images per timed embed pass")
    ap.add_argument("--batch", default="256,1024", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per batch size")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="mixed_bfloat16", help="Keras dtype policy")
    ap.add_argument("--decode-images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--jpeg-dir", help="decode these *.jpg files instead of synthetic ones")
    ap.add_argument("--faiss-n", type=int, default=1_000_000)
    ap.add_argument("--faiss-d", type=int, default=256)
    ap.add_argument("--faiss-k", type=int, default=1000, help="k-means clusters")
    ap.add_argument("--faiss-iters", type=int, default=20)
    ap.add_argument("--knn", type=int, default=10, help="neighbours per point in the graph")
    ap.add_argument("--faiss-cpu-ok", action="store_true", help="run faiss on CPU without a GPU")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no section after this")
    ap.add_argument("--skip", default="", help="sections to skip: decode,embed,faiss")
    ap.add_argument("--out", help="also write the JSON here")
    return ap.parse_args(argv)


def setup_paths(keras_path: str | None, src: str, faiss_path: str | None) -> None:
    """semclust's src and a carried faiss first on sys.path; the carried Keras packages last, so
    they only fill gaps and never shadow what the machine has installed (its own rich, yaml,
    packaging...). The carried optree likewise: its compiled module must match this Python."""
    for path in (faiss_path, src):
        if path and os.path.isdir(path):
            sys.path.insert(0, os.path.abspath(path))
    if keras_path and os.path.isdir(keras_path):
        sys.path.append(os.path.abspath(keras_path))
        optree_dir = os.path.join(keras_path, "_optree")
        if os.path.isdir(optree_dir) and importlib.util.find_spec("optree") is None:
            sys.path.append(os.path.abspath(optree_dir))
    # Keras' backend is fixed at its first import; leave GPU memory for faiss after JAX.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ----------------------------------------------------------------------------- decode


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs of ImageNet-like sizes: smooth colour fields plus grain, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def _pillow_decode_batch(blobs: list[bytes], size: int) -> tuple[np.ndarray, Any, Any, list[str]]:
    """Fallback decoder: draft-mode JPEG decode, shorter side to ``size``, centre crop."""
    from PIL import Image

    pixels = np.zeros((len(blobs), size, size, 3), np.uint8)
    for i, blob in enumerate(blobs):
        im = Image.open(io.BytesIO(blob))
        w, h = im.size
        short = min(w, h)
        # The smallest DCT scale that keeps the shorter side >= size.
        im.draft("RGB", (math.ceil(size * w / short), math.ceil(size * h / short)))
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        pixels[i] = np.asarray(im.crop((left, top, left + size, top + size)))
    return pixels, None, None, [""] * len(blobs)


_WORKER: dict[str, Any] = {}


def _init_worker(blobs: list[bytes], size: int) -> None:
    # spawn gives the worker the parent's sys.path, carried packages included.
    _WORKER.update(blobs=blobs, size=size, decoder="pillow-draft", decode=_pillow_decode_batch)
    try:
        from semclust.embed.decode import decode_batch

        _WORKER.update(decoder="semclust.embed.decode.decode_batch", decode=decode_batch)
    except Exception as exc:  # no semclust or its yaml here: plain Pillow does the same work
        _WORKER["decoder_error"] = f"{type(exc).__name__}: {exc}"


def _worker_info(_: int) -> tuple[str, str | None]:
    return _WORKER["decoder"], _WORKER.get("decoder_error")


def _decode_chunk(span: tuple[int, int]) -> tuple[np.ndarray, float, int]:
    start, count = span
    blobs = _WORKER["blobs"]
    batch = [blobs[(start + i) % len(blobs)] for i in range(count)]
    t = time.perf_counter()
    pixels, _, _, errors = _WORKER["decode"](batch, _WORKER["size"])
    return pixels, time.perf_counter() - t, sum(bool(e) for e in errors)


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    if args.jpeg_dir:
        blobs = [p.read_bytes() for p in sorted(Path(args.jpeg_dir).rglob("*.jpg"))[:256]]
        source = f"{len(blobs)} JPEGs from {args.jpeg_dir}"
    else:
        blobs = synthetic_jpegs(48)
        source = "48 synthetic 400-640 x 300-480 JPEGs (q90), cycled"
    n, chunk = args.decode_images, 32
    spans = [(s, min(chunk, n - s)) for s in range(0, n, chunk)]
    # spawn, not fork: safe whatever the parent has initialised (JAX, CUDA).
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, _init_worker, (blobs, args.size)) as pool:
        decoders = set(pool.map(_worker_info, range(args.workers * 4)))
        pool.map(_decode_chunk, spans[: args.workers])  # warm-up: imports, first allocations
        t = time.perf_counter()
        results = pool.map(_decode_chunk, spans, chunksize=1)
        wall = time.perf_counter() - t
    busy = sum(r[1] for r in results)
    assert sum(len(r[0]) for r in results) == n
    return {
        "images": n,
        "workers": args.workers,
        "source": source,
        "mean_jpeg_kb": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
        "decoder": sorted(d for d, _ in decoders),
        "decoder_fallback_reason": next((e for _, e in decoders if e), None),
        "images_per_s": round(n / wall, 1),
        "images_per_s_per_core_decoding": round(n / busy, 1),
        "note": "wall rate includes shipping the 224x224x3 uint8 arrays back to the parent",
        "failed": sum(r[2] for r in results),
    }


# ----------------------------------------------------------------------------- embed


def build_resnet50(size: int) -> tuple[Any, str]:
    """uint8 (N, S, S, 3) -> pooled ResNet50 features, random weights: semclust's own model when
    its backbones import here (they need pyarrow), else the same layers built directly."""
    import keras

    try:
        from semclust.embed.backbones.model import build_embedding_model

        return build_embedding_model("resnet50", "random", size, seed=0), "semclust"
    except ImportError as exc:
        why = f"keras.applications (semclust backbones not importable: {exc})"
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3), dtype="uint8")
    x = keras.ops.cast(inputs, "float32")
    # semclust's ResNet50 preprocessing: RGB -> BGR, ImageNet mean subtracted, in the model.
    x = keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor((103.939, 116.779, 123.68))
    base = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    return keras.Model(inputs, base(x)), why


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:
        return None


# long: one timed sweep per batch size (compile, device-resident, host-fed, Keras predict).
def bench_embed(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import keras

    keras.config.set_dtype_policy(args.dtype)
    roofline = ROOFLINE_IMAGES_PER_S * (224 / args.size) ** 2
    t = time.perf_counter()
    model, source = build_resnet50(args.size)
    out: dict[str, Any] = {
        "jax": jax.__version__,
        "keras": keras.__version__,
        "platform": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "dtype_policy": args.dtype,
        "model": source,
        "build_s": round(time.perf_counter() - t, 1),
        "assumptions": f"ResNet50 {RESNET50_GFLOP_PER_IMAGE} GFLOP/image at 224; H200 "
        f"{H200_DENSE_BF16_TFLOPS} TFLOPS dense bf16 -> {ROOFLINE_IMAGES_PER_S:.0f} images/s",
        # Convolution FLOPs scale with the pixel count at other sizes.
        "roofline_images_per_s": round(roofline),
        "runs": [],
    }

    def forward(tv: Any, ntv: Any, x: Any) -> Any:
        y, _ = model.stateless_call(tv, ntv, x, training=False)
        return y.astype(jnp.float32)

    rng = np.random.default_rng(0)
    for i, batch in enumerate(int(b) for b in args.batch.split(",")):
        if time.perf_counter() > deadline:
            out["runs"].append({"batch": batch, "skipped": "time budget"})
            continue
        run: dict[str, Any] = {"batch": batch}
        # Read afresh each time: Keras' predict donates the variables' old buffers.
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        n_batches = max(1, math.ceil(args.images / batch))
        host = [rng.integers(0, 256, (batch, args.size, args.size, 3), np.uint8) for _ in range(2)]
        dev = [jax.device_put(h) for h in host]
        t = time.perf_counter()
        fwd = jax.jit(forward).lower(tv, ntv, dev[0]).compile()
        run["compile_s"] = round(time.perf_counter() - t, 1)
        if (flops := _flops(fwd)) is not None:
            run["xla_gflop_per_image"] = round(flops / batch / 1e9, 2)
        fwd(tv, ntv, dev[0]).block_until_ready()
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ys = [fwd(tv, ntv, dev[j % 2]) for j in range(n_batches)]
            jax.block_until_ready(ys)
            rates.append(n_batches * batch / (time.perf_counter() - t))
        best = max(rates)
        run["device_resident_images_per_s"] = [round(r) for r in rates]
        run["fraction_of_roofline"] = _sig(best / roofline)
        if "xla_gflop_per_image" in run:
            run["achieved_tflops"] = _sig(best * run["xla_gflop_per_image"] / 1e3)
        # Host uint8 in, features back on the host: what an embed actor's loop pays.
        t = time.perf_counter()
        feats = [np.asarray(fwd(tv, ntv, host[j % 2])) for j in range(n_batches)]
        run["host_fed_images_per_s"] = round(n_batches * batch / (time.perf_counter() - t))
        run["finite"] = bool(all(np.isfinite(f).all() for f in feats))
        if i == 0:  # Keras' own jitted predict (the Embedder's call); one more compile
            model.predict_on_batch(host[0])
            t = time.perf_counter()
            for j in range(n_batches):
                model.predict_on_batch(host[j % 2])
            run["keras_predict_on_batch_images_per_s"] = round(
                n_batches * batch / (time.perf_counter() - t)
            )
        out["runs"].append(run)
        log(f"embed batch {batch}: {run}")
    return out


# ----------------------------------------------------------------------------- faiss


def clustered(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around k random centres (what normalised embeddings look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    x = centres[rng.integers(0, k, n)]
    x += rng.standard_normal((n, d), dtype=np.float32) * 0.6
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_faiss(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    try:
        import faiss
    except Exception as exc:
        return {"skipped": f"faiss not importable: {type(exc).__name__}: {exc}"}
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu == 0 and not args.faiss_cpu_ok:
        return {"skipped": f"faiss {faiss.__version__} sees no GPU (a CPU build?)"}
    n, d, k = args.faiss_n, args.faiss_d, args.faiss_k
    out: dict[str, Any] = {"faiss": faiss.__version__, "gpus": ngpu, "n": n, "d": d}
    t = time.perf_counter()
    x = clustered(n, d, k)
    out["data_s"] = round(time.perf_counter() - t, 1)
    # All points in every iteration (faiss samples 256 per centroid by default).
    kmeans_opts = {"niter": args.faiss_iters, "spherical": True, "seed": 1}
    km = faiss.Kmeans(d, k, gpu=ngpu > 0, max_points_per_centroid=n // k + 1, **kmeans_opts)
    t = time.perf_counter()
    km.train(x)
    secs = time.perf_counter() - t
    out["kmeans"] = {
        "k": k,
        "iterations": args.faiss_iters,
        "seconds": round(secs, 2),
        "point_iterations_per_s": round(n * args.faiss_iters / secs),
        "final_objective": float(km.obj[-1]) if len(km.obj) else None,
    }
    if time.perf_counter() > deadline:
        out["knn_graph"] = {"skipped": "time budget"}
        return out
    if ngpu:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x)
    t = time.perf_counter()
    ids = np.concatenate(
        [index.search(x[s : s + 65536], args.knn + 1)[1] for s in range(0, n, 65536)]
    )
    secs = time.perf_counter() - t
    out["knn_graph"] = {
        "exact": "Flat inner product",
        "k": args.knn,
        "seconds": round(secs, 2),
        "queries_per_s": round(n / secs),
        # Each point should find itself first (ties with exact duplicates aside).
        "self_first_fraction": round(float(np.mean(ids[:, 0] == np.arange(n))), 4),
    }
    return out


# ----------------------------------------------------------------------------- main


def run_section(name: str, fn: Any, *fargs: Any) -> dict[str, Any]:
    log(f"{name} ...")
    t = time.perf_counter()
    try:
        result = fn(*fargs)
    except Exception as exc:
        tail = traceback.format_exc().splitlines()[-6:]
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback_tail": tail}
    result["section_s"] = round(time.perf_counter() - t, 1)
    log(f"{name} done in {result['section_s']} s")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_paths(args.keras_path, args.src, args.faiss_path)
    deadline = T0 + args.budget_s
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cores": len(os.sched_getaffinity(0)),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "args": vars(args),
    }
    # Decode first: its worker pool starts before any GPU library is initialised.
    sections = (
        ("decode", bench_decode, (args,)),
        ("embed", bench_embed, (args, deadline)),
        ("faiss", bench_faiss, (args, deadline)),
    )
    for name, fn, fargs in sections:
        if name in skip:
            report[name] = {"skipped": "--skip"}
        elif time.perf_counter() > deadline:
            report[name] = {"skipped": "time budget"}
        else:
            report[name] = run_section(name, fn, *fargs)
    report["total_s"] = round(time.perf_counter() - T0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
