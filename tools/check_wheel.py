"""Checks a built fastkd wheel before it is published.

    python tools/check_wheel.py dist/fastkd-*.whl [--max-mb 100] [--require-cuda]
        [--require-targets sm_80,sm_90a,compute_120]

What it checks, failing with a message naming the file and the entry:

- every shared object in the wheel depends (``DT_NEEDED``, read with ``readelf -d``) on none of
  libtorch / libc10 (fastkd's C++ includes no torch header, so one binary serves every torch),
  libpython (extension modules resolve Python's symbols from the interpreter) or the CUDA
  runtime (linked statically); the driver, ``libcuda.so.1``, is not needed either: the runtime
  loads it on first use;
- the wheel is under ``--max-mb`` megabytes;
- with ``--require-cuda``, the extension holds CUDA code (a ``.nv_fatbin`` section);
- with ``--require-targets``, its fat binary holds SASS for each ``sm_XY`` listed (``a``/``f``
  suffixes are part of the name: ``sm_90a`` is not ``sm_90``) and PTX for each ``compute_XY``.

It prints the wheel's tags, its size, every shared object's ``DT_NEEDED`` list and CUDA targets,
and ``auditwheel show``'s summary when auditwheel is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
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


# The fat binary nvcc embeds (section .nv_fatbin): containers that start with this magic, each a
# header (u32 magic, u16 version, u16 header size, u64 size of its entries) and entries (u16
# kind: 1 PTX, 2 SASS; u16 version; u32 header size; u64 padded payload size; ...; u32 SM
# version at byte 28; u64 flags at byte 40). In the flags, 0x100000 marks an arch-specific
# target (sm_90a) and 0x200000 a family target (sm_100f): read off nvcc 13.0's output for
# sm_90 / sm_90a / sm_100a / sm_100f of one kernel, as no public document specifies them.
FATBIN_MAGIC = 0xBA55ED50
FATBIN_SUFFIX = {0x100000: "a", 0x200000: "f"}


def fatbin_targets(blob: bytes) -> set[str]:
    """The targets of the fat binary section ``blob``: ``sm_XY`` (SASS) and ``compute_XY``
    (PTX) names. ValueError for a container or entry whose sizes do not fit the section."""
    targets, offset = set(), 0
    while offset + 16 <= len(blob):
        magic, _, header, size = struct.unpack_from("<IHHQ", blob, offset)
        if magic != FATBIN_MAGIC:
            offset += 8  # containers are 8-byte aligned
            continue
        entry, end = offset + header, offset + header + size
        if header < 16 or size == 0 or end > len(blob):
            raise ValueError(f"malformed fat binary container at byte {offset}")
        while entry + 48 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            if entry_header < 48 or entry + entry_header + payload > end:
                raise ValueError(f"malformed fat binary entry at byte {entry}")
            (sm,) = struct.unpack_from("<I", blob, entry + 28)
            (flags,) = struct.unpack_from("<Q", blob, entry + 40)
            suffix = "".join(v for bit, v in FATBIN_SUFFIX.items() if flags & bit)
            prefix = {1: "compute", 2: "sm"}.get(kind)
            if prefix:
                targets.add(f"{prefix}_{sm}{suffix}")
            entry += entry_header + payload
        offset = end
    return targets


def cuda_targets(path: str) -> set[str]:
    """The CUDA targets (``fatbin_targets``) of the ELF file ``path``; empty without CUDA."""
    if not _has_cuda(path):
        return set()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fatbin")
        subprocess.run(
            ["objcopy", "-O", "binary", "--only-section=.nv_fatbin", path, out], check=True
        )
        with open(out, "rb") as f:
            return fatbin_targets(f.read())


def check(
    path: str, *, max_mb: float, require_cuda: bool, require_targets: tuple[str, ...] = ()
) -> list[str]:
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
            is_extension = os.path.basename(name).startswith("_C.")
            if require_cuda and is_extension and not _has_cuda(local):
                problems.append(f"{name} holds no CUDA kernels")
            if is_extension and (require_targets or require_cuda):
                try:
                    targets = cuda_targets(local)
                except ValueError as err:
                    problems.append(f"{name}: {err}")
                    targets = set()
                print(f"{name}: CUDA {', '.join(sorted(targets)) or '(none)'}")
                missing = sorted(set(require_targets) - targets)
                if missing:
                    problems.append(f"{name} lacks the CUDA targets {', '.join(missing)}")
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
    parser.add_argument(
        "--require-targets",
        default="",
        help="comma-separated sm_XY (SASS) and compute_XY (PTX) targets the kernels must have",
    )
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.require_targets.split(",") if t)
    problems = []
    for path in args.wheels:
        problems += check(
            path, max_mb=args.max_mb, require_cuda=args.require_cuda, require_targets=targets
        )
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
