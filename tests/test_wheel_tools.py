"""The release checks of tools/check_wheel.py (on the extension this build made, and on
synthetic wheels that break each rule) and the Triton versions a wheel accepts."""

import importlib.util
import os
import shutil
import struct
import subprocess
import zipfile

import pytest

import fastkd  # noqa: F401

ROOT = os.path.join(os.path.dirname(__file__), "..")
_TOOLS = pytest.mark.skipif(
    not shutil.which("readelf") or not shutil.which("cc"), reason="needs readelf and a C compiler"
)


def _tool():
    spec = importlib.util.spec_from_file_location(
        "check_wheel", os.path.join(ROOT, "tools", "check_wheel.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@_TOOLS
def test_the_built_extension_needs_no_torch_python_or_cuda_library():
    from fastkd.ops._native import native

    mod = native()
    if mod is None:
        pytest.skip("the extension is not built")
    tool = _tool()
    libs = tool.needed(mod.__file__)
    assert libs, "readelf found no DT_NEEDED entry at all"
    for lib in libs:
        for what, pattern in tool.FORBIDDEN.items():
            assert not pattern.search(lib), f"{mod.__file__} needs {lib} ({what})"


def _shared_object(tmp_path, name: str, needs: list[str]) -> str:
    """A shared object whose DT_NEEDED lists ``needs`` (empty stand-in libraries)."""
    src = tmp_path / "x.c"
    src.write_text("int fastkd_probe(void) { return 1; }\n")
    flags = []
    for lib in needs:
        stub = tmp_path / lib
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-o", str(stub), str(src), f"-Wl,-soname,{lib}"], check=True
        )
        flags.append(str(stub))
    out = tmp_path / name
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(out), str(src), "-Wl,--no-as-needed", *flags],
        check=True,
    )
    return str(out)


def _wheel(tmp_path, so_path: str, padding: int = 0) -> str:
    path = tmp_path / "fastkd-0.0.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.write(so_path, "fastkd/_C.cpython-311-x86_64-linux-gnu.so")
        whl.writestr(
            "fastkd-0.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: cp311-cp311-linux_x86_64\n"
        )
        if padding:
            whl.writestr("fastkd/padding.bin", os.urandom(padding))
    return str(path)


@_TOOLS
@pytest.mark.parametrize(
    "lib, what",
    [
        ("libtorch_cpu.so", "libtorch"),
        ("libc10.so", "libtorch"),
        ("libpython3.11.so.1.0", "libpython"),
        ("libcudart.so.13", "the CUDA runtime"),
        ("libcuda.so.1", "the CUDA driver"),
    ],
)
def test_a_forbidden_dependency_fails_the_check(tmp_path, lib, what):
    tool = _tool()
    bad = _wheel(tmp_path, _shared_object(tmp_path, "bad.so", [lib]))
    problems = tool.check(bad, max_mb=100, require_cuda=False)
    assert problems == [
        f"fastkd/_C.cpython-311-x86_64-linux-gnu.so needs {lib} ({what} must not be a dependency)"
    ]


@_TOOLS
def test_a_clean_wheel_passes_and_the_size_and_cuda_gates_fail(tmp_path):
    tool = _tool()
    clean = _wheel(tmp_path, _shared_object(tmp_path, "ok.so", ["libfriendly.so.1"]))
    assert tool.check(clean, max_mb=100, require_cuda=False) == []
    assert tool.check(clean, max_mb=100, require_cuda=True) == [
        "fastkd/_C.cpython-311-x86_64-linux-gnu.so holds no CUDA kernels"
    ]
    big = _wheel(tmp_path, _shared_object(tmp_path, "ok2.so", []), padding=2 << 20)
    assert any(
        "over the 1.0 MB limit" in p for p in tool.check(big, max_mb=1.0, require_cuda=False)
    )


def _fatbin(entries) -> bytes:
    """A fat binary section: two containers, the first preceded by 8 bytes of padding, holding
    ``(kind, sm, flags)`` entries with payloads of 5 bytes padded to 8."""
    containers = []
    for part in (entries[:1], entries[1:]):
        body = b"".join(
            struct.pack("<HHIQ", kind, 0x101, 64, 8)
            + bytes(12)
            + struct.pack("<I", sm)
            + bytes(8)
            + struct.pack("<Q", flags)
            + bytes(16)
            + b"code\0\0\0\0"
            for kind, sm, flags in part
        )
        containers.append(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body)
    return bytes(8) + b"".join(containers)


def test_fat_binary_targets_are_read_with_their_suffixes():
    tool = _tool()
    blob = _fatbin([(2, 80, 0x11), (2, 90, 0x100011), (2, 100, 0x1200011), (1, 120, 0x8011)])
    assert tool.fatbin_targets(blob) == {"sm_80", "sm_90a", "sm_100f", "compute_120"}
    assert tool.fatbin_targets(b"") == set()
    # Sizes that do not fit the section are refused, never looped over.
    empty_container = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 0)
    with pytest.raises(ValueError, match="malformed fat binary container at byte 0"):
        tool.fatbin_targets(empty_container)
    with pytest.raises(ValueError, match="malformed fat binary entry at byte 16"):
        tool.fatbin_targets(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 64) + bytes(64))
    with pytest.raises(ValueError, match="malformed fat binary container at byte 96"):
        tool.fatbin_targets(blob[:-8])


@_TOOLS
def test_the_built_extension_holds_the_cuda_targets_it_reports():
    from fastkd.ops._native import native

    info = fastkd.build_info()
    if native() is None or not info["cuda_kernels"] or not shutil.which("objcopy"):
        pytest.skip("the extension is built without CUDA kernels (or objcopy is missing)")
    archs = info["cuda_archs"]
    # SASS for every architecture, PTX for the last one listed (CMakeLists.txt).
    expected = {f"sm_{a}" for a in archs} | {f"compute_{archs[-1].rstrip('af')}"}
    assert _tool().cuda_targets(native().__file__) == expected


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's CPU interpreter")
def test_an_old_triton_interpreter_is_refused_with_the_version_that_works(monkeypatch):
    """Triton 3.2's interpreter (torch 2.6's) fails on the kernels: the backend then says so
    rather than failing inside a kernel. (Installed into a fresh environment by
    tools/wheel_matrix.sh: 3.2.0 failed in every Triton kernel, 3.8.0 and 3.9.0 passed.)"""
    import torch

    from fastkd.ops._native import triton_error, triton_module

    triton = triton_module()
    if triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    message = triton_error(torch.device("cpu"))
    assert message and "Triton 3.2.0's CPU interpreter" in message and "3.8 and newer" in message
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert triton_error(torch.device("cpu")) is None
