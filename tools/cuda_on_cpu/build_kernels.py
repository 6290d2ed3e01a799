"""Builds fastkd's CUDA kernels for execution on the CPU (see README.md).

The CUDA sources of ``csrc/cuda`` (and the per-divergence kd_loss units that CMakeLists.txt
generates from ``kd_loss_cuda_divergence.cu.in``, one per ``X(...)`` entry of
``FASTKD_DIVERGENCES`` in ``csrc/common/kd_math.h``) are copied into a build directory, where the
two constructs that are not C++ are rewritten line for line:

* ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::cuda_on_cpu::launch_kernel(kernel, grid, block, smem, stream, args)``;
* ``__shared__ T name[dims];`` becomes a reference to the CTA's copy of the variable, and
  ``extern __shared__ T name[];`` a pointer to the CTA's dynamic shared memory.

Everything else compiles as it is, with g++, against the stand-in CUDA headers of ``include/``
(first on the include path, and included first as nvcc does) and
``-DFASTKD_CUDA_ON_CPU -D__CUDACC__ -D__CUDA_ARCH__=900``. The objects, the
runtime, ``entry.cpp`` (ctypes entry points) and ``selftest.cu`` are linked into one shared
library, cached under ``build/cuda_on_cpu/<hash of every input and flag>/``.

Usage: ``python tools/cuda_on_cpu/build_kernels.py [--out DIR] [--jobs N]`` prints the
library's path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIBRARY_NAME = "libfastkd_cuda_on_cpu.so"

# -O1: the kernels run slowly anyway (a fiber switch per thread at every synchronization point),
# and -O2 took 1.6x the compile time for no gain in the test run. No FMA contraction and no
# strict aliasing: the kernels pun types through reinterpret_cast as nvcc allows.
CXXFLAGS = [
    "-std=c++17",
    "-O1",
    "-g0",
    "-fPIC",
    "-pthread",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-U_FORTIFY_SOURCE",
    "-DFASTKD_CUDA_ON_CPU",
]
# What nvcc gives a .cu file: its macros (the device pass of sm_90) and cuda_runtime.h included
# first.
CUDA_FLAGS = ["-x", "c++", "-D__CUDACC__", "-D__CUDA_ARCH__=900", "-include", "cuda_runtime.h"]


class BuildError(RuntimeError):
    """A compile or link step failed; the message holds the command and the compiler's output."""


# ---- source rewriting ----------------------------------------------------------------------

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<")
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([^;\[]*?)\s*\b(\w+)\s*\[\s*\]\s*;"
)
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([^;\[]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);"
)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses, brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses after offset {open_at}")


def rewrite_launches(text: str, name: str) -> str:
    """Every ``kernel<<<config>>>(args)`` of ``text`` as a ``cuda_on_cpu::launch_kernel`` call
    (newlines kept, so that line numbers stay)."""
    out, pos = [], 0
    while (m := _LAUNCH.search(text, pos)) is not None:
        close = text.find(">>>", m.end())
        if close < 0:
            raise ValueError(f"{name}: '<<<' without '>>>'")
        config = _split_top_level(text[m.end() : close])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"{name}: a launch needs 2 to 4 configuration values: {config}")
        config += ["0", "nullptr"][len(config) - 2 :]
        paren = text.index("(", close)
        end = _matching_paren(text, paren)
        args = text[paren + 1 : end]
        call = f"::cuda_on_cpu::launch_kernel({m.group(1)}, {', '.join(c.strip() for c in config)}"
        call += f", {args})" if args.strip() else ")"
        out.append(text[pos : m.start()] + call)
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite_shared(text: str, name: str) -> str:
    """``__shared__`` declarations of ``text`` as the CTA's copies (one line each)."""

    def dynamic(m: re.Match) -> str:
        ctype, var = m.group(1).strip(), m.group(2)
        return f"{ctype}* const {var} = static_cast<{ctype}*>(::cuda_on_cpu::dynamic_shared());"

    def static(m: re.Match) -> str:
        ctype, var, dims = m.group(1).strip(), m.group(2), m.group(3).strip()
        line = text.count("\n", 0, m.start()) + 1
        return (
            f'auto& {var} = ::cuda_on_cpu::shared_variable<{ctype}{dims}>("{name}:{line} {var}");'
        )

    text = _DYNAMIC_SHARED.sub(dynamic, text)
    return _STATIC_SHARED.sub(static, text)


def rewrite(text: str, name: str) -> str:
    return rewrite_shared(rewrite_launches(text, name), name)


# ---- the per-divergence units, as CMakeLists.txt generates them ----------------------------

_DIVERGENCE_MACRO = re.compile(r"#define FASTKD_DIVERGENCES\(X\)[^\n]*\\\n([^\n]*\\\n)*[^\n]*")
_DIVERGENCE_ENTRY = re.compile(r"X\((k[A-Za-z0-9_]+), ([a-z0-9_]+), [0-9]+\)")


def divergence_units(kd_math: str, template: str) -> dict[str, str]:
    """``{file name: text}`` of kd_loss_cuda_<name>.cu for every X(enumerator, name, code) of
    FASTKD_DIVERGENCES, read with CMakeLists.txt's regular expressions."""
    macro = _DIVERGENCE_MACRO.search(kd_math)
    if macro is None:
        raise BuildError("no FASTKD_DIVERGENCES(X) macro in csrc/common/kd_math.h")
    units = {}
    for enumerator, name in _DIVERGENCE_ENTRY.findall(macro.group(0)):
        text = template.replace("@FASTKD_DIVERGENCE_ENUMERATOR@", enumerator)
        units[f"kd_loss_cuda_{name}.cu"] = text.replace("@FASTKD_DIVERGENCE_NAME@", name)
    if not units:
        raise BuildError("no X(enumerator, name, code) entries in FASTKD_DIVERGENCES")
    return units


# ---- build ---------------------------------------------------------------------------------


def _sources(repo: Path) -> tuple[dict[str, str], list[str], int]:
    """(relative path -> text of every file of the build tree, the translation units, the
    number of divergence units)."""
    files: dict[str, str] = {}
    for sub in ("common", "cuda"):
        for path in sorted((repo / "csrc" / sub).iterdir()):
            if path.suffix in (".h", ".cuh", ".cu"):
                rel = f"csrc/{sub}/{path.name}"
                text = path.read_text()
                files[rel] = rewrite(text, path.name) if sub == "cuda" else text
    units = divergence_units(
        files["csrc/common/kd_math.h"],
        (repo / "csrc/cuda/kd_loss_cuda_divergence.cu.in").read_text(),
    )
    for name, text in units.items():
        files[f"generated/{name}"] = text
    for path in sorted((HERE / "include").iterdir()):
        files[f"include/{path.name}"] = path.read_text()
    for name in ("runtime.cpp", "entry.cpp", "selftest.cu"):
        text = (HERE / name).read_text()
        files[name] = rewrite(text, name) if name.endswith(".cu") else text
    tus = [rel for rel in files if rel.endswith(".cu") and rel.startswith("csrc/cuda/")]
    tus += [f"generated/{name}" for name in units]
    tus += ["runtime.cpp", "entry.cpp", "selftest.cu"]
    return files, tus, len(units)


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"command failed (exit {result.returncode}) in {cwd}:\n{shlex.join(cmd)}\n"
            f"{result.stdout}{result.stderr}"
        )


def build(out: Path | None = None, *, jobs: int | None = None, cxx: str | None = None) -> Path:
    """Compiles the CUDA kernels for the CPU (unless the cached library for exactly these inputs
    exists) and returns the shared library's path.

    Args:
        out: cache root; ``build/cuda_on_cpu`` of the repository by default.
        jobs: parallel compiles (default: the CPUs available).
        cxx: the C++ compiler (default: ``$CXX`` or ``g++``).
    Raises:
        BuildError: a compile or link step failed (with the command and its output), or the
            compiler is missing.
    """
    cxx = cxx or os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"C++ compiler {cxx!r} not found")
    files, tus, n_units = _sources(REPO)
    flags = [*CXXFLAGS, f"-DFASTKD_CUDA_DIVERGENCE_UNITS={n_units}"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (cxx, version, *flags, *CUDA_FLAGS, *sorted(files)):
        digest.update(part.encode() + b"\0")
    for rel in sorted(files):
        digest.update(files[rel].encode() + b"\0")
    root = Path(out) if out is not None else REPO / "build" / "cuda_on_cpu"
    work = root / digest.hexdigest()[:16]
    library = work / LIBRARY_NAME
    if library.exists():
        return library
    work.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side (pytest -n) build into the same directory: one builds,
    # the others wait for its library.
    with open(work / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            _compile(cxx, files, tus, flags, work, library, jobs)
    return library


def _compile(cxx, files, tus, flags, work: Path, library: Path, jobs: int | None) -> None:
    src = work / "src"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    includes = [f"-I{src / 'include'}", f"-I{src / 'csrc' / 'cuda'}", f"-I{src / 'csrc'}"]
    objects = []
    commands = []
    for rel in tus:
        obj = work / "obj" / (rel.replace("/", "_") + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        cuda = CUDA_FLAGS if rel.endswith(".cu") else []
        commands.append([cxx, *flags, *includes, *cuda, "-c", str(src / rel), "-o", str(obj)])
        objects.append(str(obj))
    workers = jobs or len(os.sched_getaffinity(0))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(_run, cmd, work) for cmd in commands]:
            future.result()
    tmp = work / (LIBRARY_NAME + ".tmp")
    _run([cxx, "-shared", "-pthread", "-o", str(tmp), *objects, "-ldl"], work)
    tmp.replace(library)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="cache root")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles")
    args = parser.parse_args(argv)
    try:
        print(build(args.out, jobs=args.jobs))
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
