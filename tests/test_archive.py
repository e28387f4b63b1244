"""masktune_core.archive: unpacking hostile archives."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from helpers import random_image
from masktune_core.archive import ExtractionLimits, extract_archive, safe_member_path
from masktune_core.errors import DatasetError

TREE = {
    "ds/train/a/1.png": b"\x89PNG a1" * 10,
    "ds/train/b/2.png": b"\x89PNG b2" * 10,
    "ds/val/a/3.png": b"\x89PNG a3",
    "ds/metadata.csv": b"filename,label\n",
}


def _zinfo(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        with zipfile.ZipFile(path, "w") as zf:
            for name, content in (members.items() if isinstance(members, dict) else members):
                zf.writestr(_zinfo(name), content)
    return path


def _tarinfo(name, size=0, type_=tarfile.REGTYPE, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname, ti.mode = size, type_, linkname, 0o644
    return ti


def make_tar(path: Path, members, mode="w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, content in (members.items() if isinstance(members, dict) else members):
            tf.addfile(_tarinfo(name, len(content)), io.BytesIO(content))
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)).replace(os.sep, "/"): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def no_links(root: Path) -> bool:
    return not any(p.is_symlink() for p in root.rglob("*"))


@pytest.fixture
def work(tmp_path):
    """(archive dir, dest) with dest nested so that escapes land in a parent we can inspect."""
    (tmp_path / "arch").mkdir()
    return tmp_path / "arch", tmp_path / "jobs" / "job1" / "dest"


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_formats_extract_same_tree(work, kind):
    arch, dest = work
    path = arch / f"ds.{kind}"
    if kind == "zip":
        make_zip(path, TREE)
    else:
        make_tar(path, TREE, "w:gz" if kind == "tar.gz" else "w")
    assert extract_archive(path, dest) == dest
    assert files_under(dest) == TREE


def test_zip_with_directory_entries_and_real_image(work):
    arch, dest = work
    img = random_image(arch / "img.png", size=(8, 8)).read_bytes()
    with zipfile.ZipFile(arch / "d.zip", "w") as zf:
        zf.writestr(_zinfo("ds/", stat.S_IFDIR | 0o755), b"")
        zf.writestr(_zinfo("ds/train/x.png"), img)
    extract_archive(arch / "d.zip", dest)
    assert files_under(dest) == {"ds/train/x.png": img}


def test_zip_member_with_permission_bits_only_is_a_regular_file(work):
    arch, dest = work
    with zipfile.ZipFile(arch / "d.zip", "w") as zf:
        zf.writestr("ds/train/a/1.png", b"data")  # external_attr = 0o600 << 16, no S_IFREG
    extract_archive(arch / "d.zip", dest)
    assert files_under(dest) == {"ds/train/a/1.png": b"data"}


# ---------------------------------------------------------------- member names


BAD_NAMES = ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "C:/evil.txt", "a\\..\\..\\evil.txt", "a/b\\evil.txt"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_safe_member_path_rejects(name):
    with pytest.raises(DatasetError):
        safe_member_path(name)


def test_safe_member_path_normalises_harmless_names():
    assert safe_member_path("./a//b/./c.png") == PurePosixPath("a/b/c.png")
    assert safe_member_path("a/b.png") == PurePosixPath("a/b.png")


def _nothing_escaped(dest: Path) -> None:
    top = dest.parent.parent.parent  # tmp_path
    assert not any(p.name == "evil.txt" for p in top.rglob("*"))
    assert not Path("/abs/evil.txt").exists()
    assert not dest.exists()  # cleaned up after the failure


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_hostile_member_names(work, name, kind):
    arch, dest = work
    members = [("ds/ok.txt", b"ok"), (name, b"pwned")]
    path = make_zip(arch / "e.zip", members) if kind == "zip" else make_tar(arch / "e.tar", members)
    with pytest.raises(DatasetError):
        extract_archive(path, dest)
    _nothing_escaped(dest)


# ---------------------------------------------------------------- links and special files


def test_tar_links_and_devices_are_not_written(work):
    arch, dest = work
    outside = dest.parent / "victim.txt"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"original")
    path = arch / "links.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(_tarinfo("ds/a.txt", 2), io.BytesIO(b"ok"))
        tf.addfile(_tarinfo("ds/passwd", type_=tarfile.SYMTYPE, linkname="/etc/passwd"))
        tf.addfile(_tarinfo("ds/up", type_=tarfile.SYMTYPE, linkname="../victim.txt"))
        tf.addfile(_tarinfo("ds/hard", type_=tarfile.LNKTYPE, linkname="/etc/passwd"))
        tf.addfile(_tarinfo("ds/hard2", type_=tarfile.LNKTYPE, linkname="ds/a.txt"))
        tf.addfile(_tarinfo("ds/fifo", type_=tarfile.FIFOTYPE))
        dev = _tarinfo("ds/null", type_=tarfile.CHRTYPE)
        dev.devmajor, dev.devminor = 1, 3
        tf.addfile(dev)
        # a regular member under the symlink's name: the link was not made, so it cannot redirect the write
        tf.addfile(_tarinfo("ds/up/b.txt", 2), io.BytesIO(b"ok"))
    extract_archive(path, dest)
    assert files_under(dest) == {"ds/a.txt": b"ok", "ds/up/b.txt": b"ok"}
    assert no_links(dest)
    assert sorted(p.name for p in (dest / "ds").iterdir()) == ["a.txt", "up"]
    assert outside.read_bytes() == b"original"


def test_zip_symlink_member_is_not_written(work):
    arch, dest = work
    with zipfile.ZipFile(arch / "l.zip", "w") as zf:
        zf.writestr(_zinfo("ds/a.txt"), b"ok")
        zf.writestr(_zinfo("ds/link", stat.S_IFLNK | 0o777), b"/etc/passwd")
    extract_archive(arch / "l.zip", dest)
    assert files_under(dest) == {"ds/a.txt": b"ok"}
    assert not (dest / "ds" / "link").exists() and not (dest / "ds" / "link").is_symlink()


# ---------------------------------------------------------------- sizes and counts


def test_zip_bomb_member_ratio(work):
    arch, dest = work
    path = arch / "bomb.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(_zinfo("ds/zeros.png"), bytes(20 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match="inflates"):
        extract_archive(path, dest)
    assert not dest.exists()


def test_incompressible_large_member_is_fine(work):
    arch, dest = work
    blob = os.urandom(3 << 20)
    make_zip(arch / "big.zip", {"ds/big.bin": blob})
    extract_archive(arch / "big.zip", dest)
    assert (dest / "ds" / "big.bin").read_bytes() == blob


def test_tar_gz_bomb_ratio(work):
    arch, dest = work
    path = make_tar(arch / "bomb.tar.gz", {"ds/zeros.png": bytes(20 << 20)}, "w:gz")
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DatasetError):
        extract_archive(path, dest)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_total_bytes_limit(work, kind):
    arch, dest = work
    members = {f"ds/{i}.bin": os.urandom(4000) for i in range(5)}
    path = make_zip(arch / "t.zip", members) if kind == "zip" else make_tar(arch / "t.tar", members)
    with pytest.raises(DatasetError, match="bytes"):
        extract_archive(path, dest, ExtractionLimits(max_total_bytes=10_000))
    assert not dest.exists()
    extract_archive(path, dest, ExtractionLimits(max_total_bytes=20_000))  # exactly fits
    assert len(files_under(dest)) == 5


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_limit(work, kind):
    arch, dest = work
    members = {f"ds/{i}.txt": b"x" for i in range(6)}
    path = make_zip(arch / "m.zip", members) if kind == "zip" else make_tar(arch / "m.tar", members)
    with pytest.raises(DatasetError, match="5"):
        extract_archive(path, dest, ExtractionLimits(max_members=5))
    assert not dest.exists()
    extract_archive(path, dest, ExtractionLimits(max_members=6))
    assert len(files_under(dest)) == 6


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("second", ["ds/a.txt", "ds/./a.txt", "./ds//a.txt"])
def test_duplicate_members(work, kind, second):
    arch, dest = work
    members = [("ds/a.txt", b"first"), ("ds/b.txt", b"b"), (second, b"second")]
    path = make_zip(arch / "d.zip", members) if kind == "zip" else make_tar(arch / "d.tar", members)
    with pytest.raises(DatasetError, match="twice"):
        extract_archive(path, dest)
    assert not dest.exists()


# ---------------------------------------------------------------- not archives / damaged


def test_not_an_archive(work):
    arch, dest = work
    (arch / "rand.zip").write_bytes(os.urandom(4096))
    with pytest.raises(DatasetError):
        extract_archive(arch / "rand.zip", dest)
    png = random_image(arch / "x.png", size=(16, 16))
    with pytest.raises(DatasetError):
        extract_archive(png, dest)
    assert not dest.exists() or not any(dest.iterdir())


def test_empty_and_missing_file(work):
    arch, dest = work
    (arch / "empty.zip").write_bytes(b"")
    with pytest.raises(DatasetError):
        extract_archive(arch / "empty.zip", dest)
    with pytest.raises(DatasetError):
        extract_archive(arch / "nope.zip", dest)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive(work, kind):
    arch, dest = work
    members = {f"ds/{i}.bin": os.urandom(20_000) for i in range(4)}
    path = arch / f"full.{kind}"
    make_zip(path, members) if kind == "zip" else make_tar(path, members, "w:gz")
    cut = arch / f"cut.{kind}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError):
        extract_archive(cut, dest)
    assert not dest.exists() or not any(dest.iterdir())


def _patched_zip(arch: Path, patch) -> Path:
    path = make_zip(arch / "p.zip", {"ds/a.txt": b"hello world " * 20000})
    b = bytearray(path.read_bytes())
    patch(b, b.find(b"PK\x03\x04"), b.find(b"PK\x01\x02"))
    path.write_bytes(bytes(b))
    return path


def _corrupt_data(b, local, central):
    for i in range(local + 60, local + 200):
        b[i] ^= 0xFF


def _encrypted(b, local, central):
    b[local + 6] |= 1  # general purpose flag bit 0: encrypted
    b[central + 8] |= 1


def _deflate64(b, local, central):
    b[local + 8] = 9  # compression method 9 (Deflate64, written by Windows Explorer), unsupported by zipfile
    b[central + 10] = 9


@pytest.mark.parametrize("patch", [_corrupt_data, _encrypted, _deflate64], ids=["corrupt", "encrypted", "deflate64"])
def test_damaged_zip_members_give_dataset_error(work, patch):
    arch, dest = work
    path = _patched_zip(arch, patch)
    with pytest.raises(DatasetError):
        extract_archive(path, dest)
