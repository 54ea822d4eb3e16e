"""The image check before first use: every kind of unusable file named, usable ones (also under
the wrong extension) passed, the cache keyed by the index, the readable index, and the
``check-data`` command."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from hvd_largebatch.cli.main import main
from hvd_largebatch.data import FileIndex
from hvd_largebatch.data.check import check_index, fingerprint, readable


def encoded(fmt, size=(40, 30), **kw):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                    ).save(buf, format=fmt, **kw)
    return buf.getvalue()


GOOD = {"a.jpg": encoded("JPEG", quality=90), "b.png": encoded("PNG"), "c.bmp": encoded("BMP"),
        "d.webp": encoded("WEBP"), "e.tif": encoded("TIFF"), "f.ppm": encoded("PPM"),
        "png_named.jpg": encoded("PNG")}  # DALI decodes by content: usable
BAD = {
    "empty.jpg": (b"", "empty file"),
    "random.png": (np.random.default_rng(1).bytes(300), "not an image DALI decodes"),
    "text.jpg": (b"hello, I am not a picture\n" * 4, "not an image DALI decodes"),
    "gif.jpg": (encoded("GIF"), "not an image DALI decodes"),
    "truncated.jpg": (encoded("JPEG", size=(200, 160))[:1500], "truncated"),
    "truncated.png": (encoded("PNG", size=(200, 160))[:3000], "truncated"),
    "header_only.png": (encoded("PNG")[:40], "PNG"),
    "zero_size.bmp": (encoded("BMP")[:18] + (0).to_bytes(4, "little") * 2 + encoded("BMP")[26:], "BMP"),
}


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "set"
    os.makedirs(root / "k")
    for name, data in GOOD.items():
        (root / "k" / name).write_bytes(data)
    for name, (data, _) in BAD.items():
        (root / "k" / name).write_bytes(data)
    return FileIndex.from_folder(str(root))


def test_every_unusable_file_is_named_and_usable_ones_pass(mixed_folder, tmp_path):
    result = check_index(mixed_folder, threads=3, cache_dir=None)
    named = {os.path.basename(mixed_folder.path(i)): reason for i, reason in result.bad.items()}
    assert sorted(named) == sorted(BAD)
    for name, (_, why) in BAD.items():
        assert named[name].startswith(f"{mixed_folder.root}/k/{name}: ") and why in named[name], named[name]
    assert result.files == len(GOOD) + len(BAD) and result.cache is None
    first = result.first_error(mixed_folder.source)
    assert first.startswith(result.bad[min(result.bad)]) and f"({len(BAD) - 1} more" in first
    assert "data.skip_bad_files" in first


def test_readable_index_leaves_out_exactly_the_bad_files(mixed_folder):
    result = check_index(mixed_folder, cache_dir=None)
    kept = readable(mixed_folder, result)
    assert len(kept) == len(GOOD)
    assert sorted(os.path.basename(kept.path(i)) for i in range(len(kept))) == sorted(GOOD)
    assert kept.labels.tolist() == [0] * len(GOOD) and kept.classes == mixed_folder.classes
    assert readable(kept, check_index(kept, cache_dir=None)) is kept


def test_result_is_cached_by_the_index_fingerprint(mixed_folder, tmp_path):
    cache = str(tmp_path / "cache")
    first = check_index(mixed_folder, cache_dir=cache)
    assert first.cache == os.path.join(cache, fingerprint(mixed_folder) + ".json") and first.seconds > 0
    # the cache is trusted: a file repaired after the check stays bad until --force
    bad_name = os.path.basename(mixed_folder.path(min(first.bad)))
    with open(mixed_folder.path(min(first.bad)), "wb") as f:
        f.write(GOOD["b.png"])
    again = check_index(mixed_folder, cache_dir=cache)
    assert again.seconds == 0 and again.bad == first.bad
    forced = check_index(mixed_folder, cache_dir=cache, force=True)
    assert forced.seconds > 0 and len(forced.bad) == len(first.bad) - 1
    assert bad_name not in " ".join(forced.bad.values())
    # another index (one file fewer) has another fingerprint
    smaller = mixed_folder.subset(np.arange(len(mixed_folder) - 1))
    assert fingerprint(smaller) != fingerprint(mixed_folder)


def test_check_data_command(mixed_folder, tmp_path, capsys):
    cache = str(tmp_path / "c")
    assert main(["check-data", mixed_folder.root, "--cache-dir", cache]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(BAD) + 1
    assert out[-1].startswith(f"{mixed_folder.root}: {len(GOOD) + len(BAD)} files, {len(BAD)} unusable")
    assert main(["check-data", mixed_folder.root, "--cache-dir", cache]) == 1
    assert "from the cache" in capsys.readouterr().out
    clean = tmp_path / "clean"
    os.makedirs(clean / "train" / "k")
    os.makedirs(clean / "val" / "k")
    (clean / "train" / "k" / "a.png").write_bytes(GOOD["b.png"])
    (clean / "val" / "k" / "a.jpg").write_bytes(GOOD["a.jpg"])
    assert main(["check-data", str(clean), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert f"{clean}/train: 1 files, 0 unusable" in out and f"{clean}/val: 1 files, 0 unusable" in out
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("hvd-largebatch check-data: error: ")
