"""Benchmark datasets: JSONL files in the prototype's formats, conversations, one image, or
synthetic → BenchRequest."""

from __future__ import annotations

import glob
import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlserve.bench.config import DatasetConfig
from vlserve.bench.inline import MediaInliner, MediaKind
from vlserve.bench.synthetic import random_text, synthetic_messages
from vlserve.bench.video import synthetic_videos

log = logging.getLogger("vlserve.bench")

Message = dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """A later user turn of a conversation: its content (images inlined) and max_tokens."""

    content: str | list[Message]
    max_tokens: int | None = None  # None: --max-tokens


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: messages with every local image already inlined as a data URL.

    A conversation is a request whose ``messages`` are its first turn (with the system message)
    and whose ``followups`` are the user turns sent after it, each with the answers so far.
    """

    id: str
    messages: list[Message]
    source: str  # "file:line", the image path, or "random"
    max_tokens: int | None = None  # a per-line override of --max-tokens (first turn)
    followups: tuple[Turn, ...] = ()

    @property
    def num_turns(self) -> int:
        return 1 + len(self.followups)


@dataclass(frozen=True)
class DatasetIssue:
    """A line that was skipped, with where it is and why."""

    source: str
    message: str


@dataclass
class Dataset:
    requests: list[BenchRequest] = field(default_factory=list)
    issues: list[DatasetIssue] = field(default_factory=list)


def media_per_request(requests: list[BenchRequest]) -> dict[str, dict[str, Any]]:
    """Images and videos per dataset request (a conversation: all its turns), for the summary."""
    counts: dict[str, list[int]] = {"images": [], "videos": []}
    for request in requests:
        contents = [m.get("content") for m in request.messages]
        contents += [turn.content for turn in request.followups]
        kinds = [
            part.get("type")
            for content in contents
            if isinstance(content, list)
            for part in content
            if isinstance(part, dict)
        ]
        counts["images"].append(kinds.count("image_url"))
        counts["videos"].append(kinds.count("video_url"))
    return {
        name: {
            "total": sum(values),
            "mean": round(sum(values) / len(values), 3) if values else 0.0,
            "max": max(values, default=0),
        }
        for name, values in counts.items()
    }


def sample_dir() -> Path:
    """The small dataset shipped with vlserve (every JSONL format, PNG/JPEG/WebP images)."""
    return Path(__file__).resolve().parent.parent / "data" / "sample"


def load_dataset(config: DatasetConfig) -> Dataset:
    """Build the requests ``config`` describes; shuffled (seeded) and limited."""
    if config.kind == "random":
        dataset = random_dataset(config)
    elif config.kind == "image":
        dataset = image_dataset(config.image_file or "", config.prompt)
    elif config.kind == "sample":
        root = sample_dir()
        dataset = load_jsonl([str(root / "*.jsonl")], str(root))
    else:
        dataset = load_jsonl(config.inputs, config.base_dir)
    if config.shuffle:
        random.Random(config.seed).shuffle(dataset.requests)
    if config.limit:
        del dataset.requests[config.limit :]
    return dataset


def random_dataset(config: DatasetConfig) -> Dataset:
    """Synthetic conversations: the first turn has the images, videos and the long text, later
    turns are short new questions. One turn draws exactly what a single request always drew
    (same seed, same data); the videos come from their own generator (seeded too)."""
    rng = random.Random(config.seed)
    videos = synthetic_videos(config)
    requests = []
    for i in range(config.num_random):
        messages = synthetic_messages(
            rng,
            config.random_input_len,
            config.random_image_sizes,
            config.random_images,
            videos.urls(i) if videos else (),
        )
        followups = tuple(
            Turn(random_text(config.random_followup_len, rng))
            for _ in range(config.random_turns - 1)
        )
        requests.append(BenchRequest(f"random-{i}", messages, "random", followups=followups))
    return Dataset(requests)


def image_dataset(path: str, prompt: str) -> Dataset:
    """``-f IMAGE``: one request, the image then ``prompt``; its id is the file name (stable)."""
    inliner = MediaInliner(None)
    try:
        url = inliner.inline(path, Path.cwd(), "image")
    except ValueError as exc:
        return Dataset(issues=[DatasetIssue(path, str(exc))])
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return Dataset([BenchRequest(Path(path).name, [{"role": "user", "content": content}], path)])


def load_jsonl(patterns: list[str] | tuple[str, ...], base_dir: str | None) -> Dataset:
    """Read every file the glob ``patterns`` match; bad lines become issues, never errors."""
    dataset = Dataset()
    inliner = MediaInliner(base_dir)
    seen: dict[str, int] = {}
    for pattern in patterns:
        paths = _expand(pattern)
        if not paths:
            dataset.issues.append(DatasetIssue(pattern, "no file matches"))
        for path in paths:
            _load_file(path, inliner, dataset, seen)
    for issue in dataset.issues:
        log.warning("skipped %s: %s", issue.source, issue.message)
    return dataset


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.jsonl"))
    if path.is_file():
        return [path]
    # Relative patterns are relative to the working directory (the prototype globbed from "/").
    return [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]


def _load_file(path: Path, inliner: MediaInliner, dataset: Dataset, seen: dict[str, int]) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        dataset.issues.append(DatasetIssue(str(path), f"cannot read: {exc}"))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            request = _parse_line(json.loads(line), inliner, path.parent, where)
        except (ValueError, TypeError, KeyError) as exc:
            dataset.issues.append(DatasetIssue(where, str(exc)))
            continue
        record_id = request.id or f"{path.name}:{number}"  # stable across runs, for --resume
        count = seen.get(record_id, 0) + 1
        seen[record_id] = count
        if count > 1:
            record_id = f"{record_id}#{count}"
        dataset.requests.append(replace(request, id=record_id))


def _parse_line(record: Any, inliner: MediaInliner, here: Path, where: str) -> BenchRequest:
    """A request (id "" when the line has none) from one JSONL value."""
    if isinstance(record, dict) and "turns" in record:
        return parse_conversation(record, inliner, here, where)
    record_id, messages, max_tokens = parse_record(record, inliner, here)
    return BenchRequest(record_id or "", messages, where, max_tokens)


def parse_record(
    record: Any, inliner: MediaInliner, here: Path
) -> tuple[str | None, list[Message], int | None]:
    """One JSONL value in any supported format → (id or None, messages, max_tokens or None)."""
    if isinstance(record, list):
        first = record[0] if record else None
        record_id = first.get("id") if isinstance(first, dict) else None
        return _str_or_none(record_id), _messages(record, inliner, here), None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object or list, got {type(record).__name__}")
    max_tokens = _max_tokens(record.get("max_tokens"))
    record_id = _str_or_none(record.get("id"))
    if "messages" in record:
        return record_id, _messages(record["messages"], inliner, here), max_tokens
    images = [*_as_list(record.get("image_url")), *_as_list(record.get("image_path"))]
    videos = [*_as_list(record.get("video_url")), *_as_list(record.get("video_path"))]
    text = record.get("prompt", record.get("text"))
    if not images and not videos and text is None:
        raise ValueError(f"no {', '.join(map(repr, _REQUEST_FIELDS))} field")
    if text is not None and not isinstance(text, str):
        raise ValueError("'prompt'/'text' must be a string")
    # Images and videos first, then the question: the order Qwen-VL's own examples use.
    parts: list[Message] = [_media_part("image", url, inliner, here) for url in images]
    parts += [_media_part("video", url, inliner, here) for url in videos]
    if text:
        parts.append({"type": "text", "text": text})
    content: Any = parts if images or videos else text
    return record_id, [{"role": "user", "content": content}], max_tokens


_MEDIA_FIELDS = ("image_url", "image_path", "video_url", "video_path")
_REQUEST_FIELDS = ("messages", "prompt", "text", *_MEDIA_FIELDS)
_NOT_WITH_TURNS = _REQUEST_FIELDS


def parse_conversation(
    record: dict[str, Any], inliner: MediaInliner, here: Path, where: str
) -> BenchRequest:
    """``{"id", "turns": [turn, …], "system"?, "max_tokens"?}`` → a request with followups.

    A turn is a string, a list of content parts, or ``{"content": …, "max_tokens": N}``; the
    line's ``max_tokens`` applies to every turn that does not set its own.
    """
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list")
    mixed = [key for key in _NOT_WITH_TURNS if key in record]
    if mixed:
        raise ValueError(f"'turns' cannot be combined with {mixed}")
    default = _max_tokens(record.get("max_tokens"))
    parsed = [_turn(turn, index, default, inliner, here) for index, turn in enumerate(turns)]
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": parsed[0].content})
    record_id = _str_or_none(record.get("id")) or ""
    return BenchRequest(record_id, messages, where, parsed[0].max_tokens, tuple(parsed[1:]))


def _turn(value: Any, index: int, default: int | None, inliner: MediaInliner, here: Path) -> Turn:
    try:
        max_tokens = default
        if isinstance(value, dict):
            if "content" not in value:
                raise ValueError("an object turn needs 'content'")
            max_tokens = _max_tokens(value.get("max_tokens")) or default
            value = value["content"]
        if not isinstance(value, (str, list)) or not value:
            raise ValueError("content must be a non-empty string or list of parts")
        return Turn(_content(value, inliner, here), max_tokens)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"turn {index}: {exc}") from None


def _max_tokens(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError("max_tokens must be a positive integer")
    return value


def _messages(value: Any, inliner: MediaInliner, here: Path) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} has no 'role'")
        if "content" not in message:
            raise ValueError(f"message {index} has no 'content'")
        out = {k: v for k, v in message.items() if k != "id"}
        out["content"] = _content(message["content"], inliner, here)
        messages.append(out)
    return messages


def _content(content: Any, inliner: MediaInliner, here: Path) -> Any:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("'content' must be a string or a list of parts")
    parts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"content part {index} is not an object")
        parts.append(_part(part, inliner, here))
    return parts


def _part(part: Message, inliner: MediaInliner, here: Path) -> Message:
    """One content part with its local image or video inlined; other parts as they are."""
    kind = part.get("type")
    if kind in ("image_url", "video_url"):  # OpenAI / vLLM: {"url": …} or a bare string
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        media: MediaKind = "image" if kind == "image_url" else "video"
        return {**part, kind: {**_dict(value), "url": _inline(media, url, inliner, here)}}
    if kind == "image":  # Qwen-style {"type": "image", "image": path}
        return _media_part("image", part.get("image"), inliner, here)
    if kind == "video":  # Qwen-style {"type": "video", "video": path}
        return _media_part("video", part.get("video"), inliner, here)
    return part


def _media_part(kind: MediaKind, url: Any, inliner: MediaInliner, here: Path) -> Message:
    """An OpenAI-style part: ``image_url`` or (vLLM's) ``video_url``."""
    return {"type": f"{kind}_url", f"{kind}_url": {"url": _inline(kind, url, inliner, here)}}


def _inline(kind: MediaKind, url: Any, inliner: MediaInliner, here: Path) -> str:
    if kind == "video" and isinstance(url, list):
        raise ValueError("a video must be one file or URL (a list of frames is not supported)")
    if not isinstance(url, str) or not url:
        article = "an" if kind == "image" else "a"
        raise ValueError(f"{article} {kind} URL or path must be a non-empty string")
    return inliner.inline(url, here, kind)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
