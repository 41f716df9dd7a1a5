"""Which BLAS MLX's CPU matmuls use, and an OpenBLAS in its place on Linux.

The Linux `mlx[cpu]` wheel links a slow reference BLAS. An OpenBLAS loaded first (LD_PRELOAD)
takes its place and makes float32 decoding several times faster, but LD_PRELOAD only works when
set before the process starts: the command-line entry points re-run themselves with it set
(`use_system_openblas`). A system OpenBLAS is preferred; else, on x86_64, the one the
`ngsolve-openblas` wheel brings (a dependency there), whose libgfortran.so.5 comes from the mlx
wheel's own copy through links in the cache directory (a fresh system has none).
MLX_VOCABTRIM_OPENBLAS=0 turns this off (and the notice when none is found);
MLX_VOCABTRIM_OPENBLAS=/path/libopenblas.so picks the library.
"""

import ctypes.util
import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

ENV = "MLX_VOCABTRIM_OPENBLAS"
_REEXEC = "MLX_VOCABTRIM_OPENBLAS_REEXEC"
INSTALL = "sudo apt-get install libopenblas0-pthread"
WHEEL = "ngsolve_openblas"  # the import name of the ngsolve-openblas wheel (pyproject.toml, Linux x86_64)
CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def _opted_out() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def _mlx_libs() -> Path | None:
    """The folder of the libraries the Linux MLX wheel carries (its reference BLAS among them), if any."""
    spec = importlib.util.find_spec("mlx")
    if sys.platform != "linux" or spec is None or not spec.submodule_search_locations:
        return None
    found = [
        lib.parent for p in spec.submodule_search_locations for lib in Path(p).parent.glob("mlx*.libs/libblas*.so*")
    ]
    return found[0] if found else None


def bundled_reference_blas() -> bool:
    """True on Linux when the installed MLX wheel carries its own reference BLAS."""
    return _mlx_libs() is not None


def wheel_openblas() -> str | None:
    """The OpenBLAS of the installed ngsolve-openblas wheel (found without importing it), if any."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(lib for p in spec.submodule_search_locations for lib in Path(p).glob("libopenblas*.so*"))
    return str(libs[0]) if libs else None


def find_openblas() -> str | None:
    """The OpenBLAS to preload: $MLX_VOCABTRIM_OPENBLAS, a system one (Debian/Fedora paths, the linker's
    search), else the ngsolve-openblas wheel's."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen and not _opted_out():
        return chosen if Path(chosen).is_file() else None
    arch = platform.machine()
    for pattern in CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("openblas") or wheel_openblas()


def gfortran_links(libs: Path, root: Path) -> Path | None:
    """A folder under `root` in which `libgfortran.so.5` links to the copy the MLX wheel carries in `libs`
    (and its libquadmath, by its own name, beside it): the wheel's OpenBLAS needs a file of that name on
    the loader's path and a fresh system has none. One folder per `libs`, so environments sharing a cache
    never repoint each other's links. None when `libs` holds no libgfortran."""
    gfortran = sorted(libs.glob("libgfortran*.so*"))
    if not gfortran:
        return None
    targets = {"libgfortran.so.5": gfortran[0], **{lib.name: lib for lib in libs.glob("libquadmath*.so*")}}
    folder = root / "libgfortran" / hashlib.sha256(str(libs.resolve()).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        link = folder / name
        if not link.is_symlink() or link.readlink() != target:
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)  # whole: a concurrent start sees the old link or the new one
    return folder


def _preload_env(library: str) -> dict[str, str]:
    """The variables that preload `library`; the wheel's OpenBLAS also gets the MLX wheel's libgfortran on
    LD_LIBRARY_PATH. Raises OSError when the links cannot be written."""
    env = {"LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD", "")]))}
    libs = _mlx_libs()
    if libs is None or library != wheel_openblas():
        return env
    from .files import cache_dir

    links = gfortran_links(libs, cache_dir())
    if links is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(links), os.environ.get("LD_LIBRARY_PATH", "")]))
    return env


def _preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def use_system_openblas() -> None:
    """Re-run this command with an OpenBLAS preloaded (`find_openblas`) when MLX would otherwise use
    its bundled reference BLAS; a no-op on macOS, when opted out, or with no OpenBLAS found."""
    if _opted_out() or os.environ.get(_REEXEC) or _preloaded() or not bundled_reference_blas():
        return
    library = find_openblas()
    if library is None:
        return
    try:
        env = dict(os.environ, **_preload_env(library), **{_REEXEC: "1"})
    except OSError:
        return  # no writable cache for the libgfortran links: stay on the reference BLAS
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
        f"Note: MLX is using its slow reference BLAS; `{INSTALL}` makes decoding several times faster "
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
