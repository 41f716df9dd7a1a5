"""The OpenBLAS that replaces the mlx[cpu] wheel's reference BLAS: the ngsolve-openblas wheel's, with
the libgfortran.so.5 it needs linked from the mlx wheel's own copy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_vocabtrim import blas


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return [folder / name for name in names]


def test_libgfortran_links_name_the_mlx_wheels_copy(tmp_path):
    libs = tmp_path / "site" / "mlx_cpu.libs"
    gfortran, quadmath, _ = _touch(libs, "libgfortran-aaaa.so.5.0.0", "libquadmath-bbbb.so.0.0.0", "libblas-cccc.so.3")
    folder = blas.gfortran_links(libs, tmp_path / "cache")
    assert {p.name: p.readlink() for p in folder.iterdir()} == {
        "libgfortran.so.5": gfortran,
        quadmath.name: quadmath,
    }, "libgfortran under the name the OpenBLAS asks for, libquadmath under the name libgfortran asks for"
    gfortran.unlink()
    (newer,) = _touch(libs, "libgfortran-dddd.so.5.0.0")
    assert blas.gfortran_links(libs, tmp_path / "cache") == folder
    assert (folder / "libgfortran.so.5").readlink() == newer, "an upgraded mlx wheel: the link follows it"
    other = _touch(tmp_path / "other-venv" / "mlx_cpu.libs", "libgfortran-eeee.so.5.0.0")[0].parent
    assert blas.gfortran_links(other, tmp_path / "cache") != folder, "each environment keeps its own links"
    assert blas.gfortran_links(_touch(tmp_path / "no-fortran", "libblas.so.3")[0].parent, tmp_path) is None


def test_the_wheels_openblas_gets_the_links(monkeypatch, tmp_path):
    wheel = "/site/ngsolve_openblas/libopenblasp-r0.3.33.so"
    libs = _touch(tmp_path / "mlx_cpu.libs", "libgfortran-aaaa.so.5.0.0")[0].parent
    monkeypatch.setattr(blas, "_mlx_libs", lambda: libs)
    monkeypatch.setattr(blas, "wheel_openblas", lambda: wheel)
    monkeypatch.setenv("MLX_VOCABTRIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/lib")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = blas._preload_env(wheel)
    links = blas.gfortran_links(libs, tmp_path / "cache")
    assert env == {"LD_PRELOAD": wheel, "LD_LIBRARY_PATH": f"{links}:/opt/lib"}
    assert blas._preload_env("/usr/lib/libopenblas.so.0") == {"LD_PRELOAD": "/usr/lib/libopenblas.so.0"}, (
        "a system OpenBLAS finds its own libgfortran"
    )


@pytest.mark.skipif(blas.wheel_openblas() is None or not blas.bundled_reference_blas(), reason="Linux x86_64 only")
def test_the_wheels_openblas_runs_mlx_matmuls(tmp_path):
    """A real re-run onto the wheel's OpenBLAS: it is mapped with the mlx wheel's libgfortran (found
    through the links even where the system has one) and its products match numpy's."""
    code = (
        "from mlx_vocabtrim.blas import use_system_openblas; use_system_openblas()\n"
        "import mlx.core as mx\n"
        "a, b = mx.random.normal((96, 80), key=mx.random.key(0)), mx.random.normal((80, 64), key=mx.random.key(1))\n"
        "c = a @ b; mx.eval(c)\n"
        "print(*sorted({l.split()[-1] for l in open('/proc/self/maps') if 'blas' in l or 'gfortran' in l}))\n"
        "import numpy as np  # after the listing: numpy maps its own OpenBLAS and libgfortran\n"
        "assert np.allclose(np.array(c), np.array(a) @ np.array(b), atol=1e-4)\n"
    )
    env = dict(os.environ, MLX_VOCABTRIM_OPENBLAS=blas.wheel_openblas(), MLX_VOCABTRIM_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    mapped = done.stdout.split()
    assert blas.wheel_openblas() in mapped
    assert [Path(p).parent for p in mapped if "gfortran" in p] == [blas._mlx_libs()], mapped


def test_a_system_openblas_comes_first_then_the_wheels(monkeypatch, tmp_path):
    system = _touch(tmp_path, "libopenblas.so.0")[0]
    monkeypatch.delenv(blas.ENV, raising=False)
    monkeypatch.setattr(blas, "wheel_openblas", lambda: "/site/ngsolve_openblas/libopenblasp-r0.3.33.so")
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(blas, "CANDIDATES", (str(system),))
    assert blas.find_openblas() == str(system)
    monkeypatch.setattr(blas, "CANDIDATES", ())
    assert blas.find_openblas() == blas.wheel_openblas(), "no system OpenBLAS: the wheel's"
    monkeypatch.setenv(blas.ENV, str(system))
    assert blas.find_openblas() == str(system), "MLX_VOCABTRIM_OPENBLAS still picks the library"
