"""Checks a built fastkd wheel before it is published.

    python tools/check_wheel.py dist/fastkd-*.whl [--max-mb 100] [--require-cuda]

What it checks, failing with a message naming the file and the entry:

- every shared object in the wheel depends (``DT_NEEDED``, read with ``readelf -d``) on none of
  libtorch / libc10 (fastkd's C++ includes no torch header, so one binary serves every torch),
  libpython (extension modules resolve Python's symbols from the interpreter) or the CUDA
  runtime (linked statically); the driver, ``libcuda.so.1``, is not needed either: the runtime
  loads it on first use;
- the wheel is under ``--max-mb`` megabytes;
- with ``--require-cuda``, the extension holds CUDA code (a ``.nv_fatbin`` section).

It prints the wheel's tags, its size, every shared object's ``DT_NEEDED`` list, and
``auditwheel show``'s summary when auditwheel is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

# Libraries a fastkd binary must not need (matched against the DT_NEEDED soname).
FORBIDDEN = {
    "libtorch": re.compile(r"^lib(torch|c10|shm)[\w.-]*\.so"),
    "libpython": re.compile(r"^libpython\d"),
    "the CUDA runtime": re.compile(r"^libcudart\.so"),
    "the CUDA driver": re.compile(r"^libcuda\.so"),
}


def needed(path: str) -> list[str]:
    """The ``DT_NEEDED`` sonames of the ELF file ``path``."""
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True)
    if out.returncode:
        raise ValueError(f"{path} is not an ELF shared object: {out.stderr.strip()}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def wheel_tags(whl: zipfile.ZipFile) -> list[str]:
    wheel_meta = next(n for n in whl.namelist() if n.endswith(".dist-info/WHEEL"))
    text = whl.read(wheel_meta).decode()
    return re.findall(r"^Tag: (.+)$", text, flags=re.M)


def check(path: str, *, max_mb: float, require_cuda: bool) -> list[str]:
    """The problems found in the wheel at ``path`` (empty when it passes); prints a report."""
    problems = []
    size_mb = os.path.getsize(path) / 2**20
    print(f"wheel: {os.path.basename(path)}  {size_mb:.2f} MB")
    if size_mb >= max_mb:
        problems.append(f"{path}: {size_mb:.1f} MB, over the {max_mb} MB limit")
    with zipfile.ZipFile(path) as whl, tempfile.TemporaryDirectory() as tmp:
        print("tags: " + ", ".join(wheel_tags(whl)))
        objects = [n for n in whl.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        if not objects:
            problems.append(f"{path}: no compiled extension inside")
        if require_cuda and not any(os.path.basename(n).startswith("_C.") for n in objects):
            problems.append(f"{path}: no fastkd/_C extension to hold the CUDA kernels")
        for name in objects:
            local = whl.extract(name, tmp)
            libs = needed(local)
            print(f"{name}: NEEDED {', '.join(libs) or '(none)'}")
            for lib in libs:
                for what, pattern in FORBIDDEN.items():
                    if pattern.search(lib):
                        problems.append(f"{name} needs {lib} ({what} must not be a dependency)")
            if require_cuda and os.path.basename(name).startswith("_C.") and not _has_cuda(local):
                problems.append(f"{name} holds no CUDA kernels")
    if shutil.which("auditwheel"):
        show = subprocess.run(["auditwheel", "show", path], capture_output=True, text=True)
        print(show.stdout.strip() or show.stderr.strip())
    return problems


def _has_cuda(path: str) -> bool:
    """Whether the ELF file holds a CUDA fat binary (the ``.nv_fatbin`` section nvcc emits)."""
    out = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, check=True)
    return ".nv_fatbin" in out.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="+")
    parser.add_argument("--max-mb", type=float, default=100.0)
    parser.add_argument("--require-cuda", action="store_true")
    args = parser.parse_args(argv)
    problems = []
    for path in args.wheels:
        problems += check(path, max_mb=args.max_mb, require_cuda=args.require_cuda)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
