"""Which BLAS MLX's CPU matmuls use, and the system OpenBLAS on Linux.

The Linux `mlx[cpu]` wheel links a slow reference BLAS. A system OpenBLAS loaded first
(LD_PRELOAD) takes its place and makes float32 decoding about 2-3x faster, but LD_PRELOAD only
works when set before the process starts: the command-line entry points re-run themselves
with it set (`use_system_openblas`). MLX_VOCABTRIM_OPENBLAS=0 turns this off (and the notice
when none is installed); MLX_VOCABTRIM_OPENBLAS=/path/libopenblas.so picks the library.
"""

import ctypes.util
import importlib.util
import os
import platform
import sys
from pathlib import Path

ENV = "MLX_VOCABTRIM_OPENBLAS"
_REEXEC = "MLX_VOCABTRIM_OPENBLAS_REEXEC"
INSTALL = "sudo apt-get install libopenblas0-pthread"
CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def _opted_out() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def bundled_reference_blas() -> bool:
    """True on Linux when the installed MLX wheel carries its own reference BLAS."""
    spec = importlib.util.find_spec("mlx")
    if sys.platform != "linux" or spec is None or not spec.submodule_search_locations:
        return False
    return any(any(Path(p).parent.glob("mlx*.libs/libblas*.so*")) for p in spec.submodule_search_locations)


def find_openblas() -> str | None:
    """The system OpenBLAS: $MLX_VOCABTRIM_OPENBLAS, Debian/Fedora paths, or the linker's search."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen and not _opted_out():
        return chosen if Path(chosen).is_file() else None
    arch = platform.machine()
    for pattern in CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("openblas")


def _preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def use_system_openblas() -> None:
    """Re-run this command with a system OpenBLAS preloaded when MLX would otherwise use its
    bundled reference BLAS; a no-op on macOS, when opted out, or with no OpenBLAS installed."""
    if _opted_out() or os.environ.get(_REEXEC) or _preloaded() or not bundled_reference_blas():
        return
    library = find_openblas()
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD", "")]))
    env = dict(os.environ, LD_PRELOAD=preload, **{_REEXEC: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


def notice() -> str | None:
    """One line for users on the slow reference BLAS with no OpenBLAS to switch to; else None."""
    if _opted_out() or _preloaded() or not bundled_reference_blas() or find_openblas() is not None:
        return None
    return (
        f"Note: MLX is using its slow reference BLAS; `{INSTALL}` makes decoding about 2-3x faster "
        f"(mlx-vocabtrim then uses it; {ENV}=0 hides this note)"
    )


def blas_library() -> str:
    """The BLAS MLX's CPU matmuls go through: a preloaded OpenBLAS wins over the wheel's own."""
    preloaded = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "blas" in p]
    if preloaded:
        return f"{', '.join(preloaded)} (preloaded)"
    maps = Path("/proc/self/maps")
    if maps.exists():
        libs = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "blas" in line.lower()}
        libs = {lib for lib in libs if "scipy_openblas" not in lib}  # numpy's own copy, unused by MLX
        return f"{', '.join(sorted(libs))} (the mlx wheel's reference BLAS)" if libs else "none found"
    return "Accelerate" if platform.system() == "Darwin" else "unknown"
