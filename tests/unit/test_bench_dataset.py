"""Datasets: every prototype JSONL format, image inlining, bad lines, synthetic data, -f IMAGE."""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from vlserve.bench.config import DatasetConfig
from vlserve.bench.dataset import image_dataset, load_dataset, load_jsonl, sample_dir
from vlserve.bench.synthetic import WORDS, parse_size, png_bytes, random_text, synthetic_messages

PNG = png_bytes(2, 1, bytes([255, 0, 0, 0, 255, 0]))
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    (images / "b.jpg").write_bytes(JPEG)
    (images / "c.webp").write_bytes(WEBP)
    return tmp_path


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def image_urls(messages: list[dict]) -> list[str]:
    return [
        part["image_url"]["url"]
        for m in messages
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]


def decoded(url: str) -> tuple[str, bytes]:
    head, _, b64 = url.partition(",")
    return head, base64.b64decode(b64)


def test_every_prototype_format(data_dir: Path) -> None:
    lines = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.png"}}]}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        {"id": "m", "messages": [{"role": "user", "content": "hello"}]},
        {"id": "p", "prompt": "a prompt"},
        {"id": "t", "text": "a text"},
        {"id": "iu", "image_url": "imgs/b.jpg", "text": "what?"},
        {"id": "ip", "image_path": "imgs/c.webp", "prompt": "which?"},
        {"id": "two", "image_path": ["imgs/a.png", "imgs/b.jpg"]},
    ]
    ds = load_jsonl([str(write_jsonl(data_dir / "d.jsonl", lines))], str(data_dir))
    assert ds.issues == []
    by_id = {r.id: r for r in ds.requests}
    assert list(by_id) == ["d.jsonl:1", "d.jsonl:2", "m", "p", "t", "iu", "ip", "two"]
    assert by_id["d.jsonl:2"].messages[0] == {"role": "system", "content": "be brief"}
    assert by_id["p"].messages == [{"role": "user", "content": "a prompt"}]
    assert by_id["t"].messages == [{"role": "user", "content": "a text"}]
    # The prototype took {"text", "image_url"} as text-only and silently dropped the image.
    iu = by_id["iu"].messages[0]["content"]
    assert [p["type"] for p in iu] == ["image_url", "text"] and iu[1]["text"] == "what?"
    assert decoded(iu[0]["image_url"]["url"]) == ("data:image/jpeg;base64", JPEG)
    assert decoded(image_urls(by_id["ip"].messages)[0]) == ("data:image/webp;base64", WEBP)
    assert decoded(image_urls(by_id["d.jsonl:1"].messages)[0]) == ("data:image/png;base64", PNG)
    assert len(image_urls(by_id["two"].messages)) == 2


def test_images_resolve_under_base_dir_then_jsonl_folder(data_dir: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "x.png").write_bytes(PNG)
    path = write_jsonl(other / "d.jsonl", [{"image_path": "imgs/a.png"}, {"image_path": "x.png"}])
    ds = load_jsonl([str(path)], str(data_dir))
    assert ds.issues == [] and len(ds.requests) == 2


def test_bad_lines_are_reported_with_file_and_line_and_skipped(data_dir: Path) -> None:
    path = write_jsonl(
        data_dir / "bad.jsonl",
        [
            {"prompt": "fine"},
            "{not json",
            {"unknown": 1},
            {"image_path": "imgs/missing.png"},
            [{"content": "no role"}],
            "42",
            {"prompt": "also fine"},
        ],
    )
    ds = load_jsonl([str(path)], str(data_dir))
    assert [r.source for r in ds.requests] == [f"{path}:1", f"{path}:7"]
    assert [i.source for i in ds.issues] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "missing.png" in ds.issues[2].message


def test_ids_are_stable_across_loads_and_made_unique(data_dir: Path) -> None:
    path = write_jsonl(
        data_dir / "d.jsonl", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}, {"text": "c"}]
    )
    first = [r.id for r in load_jsonl([str(path)], None).requests]
    assert first == ["x", "x#2", "d.jsonl:3"]
    assert [r.id for r in load_jsonl([str(path)], None).requests] == first


def test_relative_glob_is_relative_to_cwd(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The prototype globbed relative patterns from "/".
    sub = data_dir / "sets"
    sub.mkdir()
    write_jsonl(sub / "one.jsonl", [{"text": "a"}])
    write_jsonl(sub / "two.jsonl", [{"text": "b"}])
    monkeypatch.chdir(data_dir)
    assert len(load_jsonl(["sets/*.jsonl"], None).requests) == 2
    assert len(load_jsonl(["sets"], None).requests) == 2  # a directory means its *.jsonl
    assert load_jsonl(["nothing/*.jsonl"], None).issues[0].message == "no file matches"


def test_shuffle_is_seeded_and_limit_applies_after(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "d.jsonl", [{"id": str(i), "text": "t"} for i in range(20)])

    def ids(**kw: Any) -> list[str]:
        return [r.id for r in load_dataset(DatasetConfig(inputs=(str(path),), **kw)).requests]

    assert ids(limit=3) == ["0", "1", "2"]
    assert ids(shuffle=True, seed=1) == ids(shuffle=True, seed=1) != ids()
    assert ids(shuffle=True, seed=1, limit=5) == ids(shuffle=True, seed=1)[:5]


def test_single_image_file(data_dir: Path) -> None:
    ds = image_dataset(str(data_dir / "imgs" / "a.png"), "Describe the image.")
    (request,) = ds.requests
    assert request.id == "a.png"
    content = request.messages[0]["content"]
    assert content[1] == {"type": "text", "text": "Describe the image."}
    assert decoded(content[0]["image_url"]["url"])[1] == PNG
    assert image_dataset(str(data_dir / "nope.png"), "x").issues


def test_sample_dataset_covers_every_format_without_issues() -> None:
    ds = load_dataset(DatasetConfig(kind="sample"))
    assert ds.issues == [] and len(ds.requests) >= 8
    mimes = {decoded(u)[0] for r in ds.requests for u in image_urls(r.messages)}
    assert mimes == {"data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64"}
    size = sum(p.stat().st_size for p in sample_dir().rglob("*") if p.is_file())
    assert size < 200_000


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    return width, height


def test_synthetic_requests_text_length_and_images() -> None:
    messages = synthetic_messages(random.Random(0), 50, ((64, 32), (16, 16)), 3)
    parts: Any = messages[0]["content"]
    sizes = [png_size(decoded(p["image_url"]["url"])[1]) for p in parts[:3]]
    assert sizes == [(64, 32), (16, 16), (64, 32)]
    assert len(parts[3]["text"].split()) == 50
    assert set(parts[3]["text"].split()) <= set(WORDS)
    assert random_text(10, random.Random(1)) == random_text(10, random.Random(1))
    ds = load_dataset(DatasetConfig(kind="random", num_random=4, random_input_len=5))
    assert [r.id for r in ds.requests] == ["random-0", "random-1", "random-2", "random-3"]
    assert len({r.messages[0]["content"][0]["text"] for r in ds.requests}) == 4


def test_parse_size() -> None:
    assert parse_size("448x336") == (448, 336)
    for bad in ("448", "0x4", "axb"):
        with pytest.raises(ValueError):
            parse_size(bad)
