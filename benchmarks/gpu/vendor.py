"""Build ``benchmarks/gpu/vendor/``: Keras and what it imports that a PyTorch + JAX + CuPy machine
may lack, for a GPU machine with no package registry (``run.py --keras-path``).

Copied from this environment (sources only, no ``__pycache__`` or compiled modules):
keras, absl, namex, rich, markdown_it, mdurl, packaging, typing_extensions and PyYAML (its pure
Python fallback; semclust's decoder imports ``semclust.config``, which needs yaml). Keras also
needs ``optree``, a compiled module: ``vendor/_optree/`` holds its Python files plus one
``_C.cpython-3XX-*.so`` per Python version (downloaded as wheels with ``pip download``, which
needs PyPI here, not on the GPU machine), so it imports on whichever Python the GPU machine runs;
``run.py`` uses it only where no optree is installed.

    .venv/bin/python benchmarks/gpu/vendor.py                 # about 19 MB
    .venv/bin/python benchmarks/gpu/vendor.py --no-download   # this Python's optree only
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PURE = (
    "keras",
    "absl",
    "namex",
    "rich",
    "markdown_it",
    "mdurl",
    "packaging",
    "typing_extensions",
    "yaml",
)
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")


def _source(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise SystemExit(f"{name} is not installed in this environment")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin)


def _copy(name: str, dest: Path) -> None:
    src = _source(name)
    if src.is_dir():
        shutil.copytree(src, dest / src.name, ignore=_IGNORE)
    else:
        shutil.copy2(src, dest / src.name)


def _optree(dest: Path, download: bool) -> list[str]:
    """optree's Python files plus its extension for each Python in PYTHONS we can get."""
    import optree

    version = optree.__version__
    target = dest / "_optree"
    target.mkdir(parents=True)
    src = _source("optree")
    shutil.copytree(src, target / "optree", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not download:
        return [f.name for f in (target / "optree").glob("_C*.so")]
    with tempfile.TemporaryDirectory() as tmp:
        for py in PYTHONS:
            cmd = [sys.executable, "-m", "pip", "download", f"optree=={version}", "--no-deps"]
            cmd += ["--only-binary=:all:", "--python-version", py, "-d", tmp, "-q"]
            for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64"):
                cmd += ["--platform", plat]
            if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                print(f"no optree {version} wheel for Python {py}", file=sys.stderr)
        for wheel in Path(tmp).glob("optree-*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if member.startswith("optree/_C") and member.endswith(".so"):
                        (target / member).write_bytes(zf.read(member))
    return sorted(f.name for f in (target / "optree").glob("_C*.so"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dest", type=Path, default=HERE / "vendor")
    ap.add_argument("--no-download", action="store_true", help="no optree wheels from PyPI")
    args = ap.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    for name in PURE:
        _copy(name, args.dest)
    builds = _optree(args.dest, download=not args.no_download)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MiB; optree builds: {', '.join(builds)}")


if __name__ == "__main__":
    main()
