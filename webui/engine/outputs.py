"""Saving generated images as A1111 does: ``outdir/YYYY-MM-DD/NNNNN-SEED-PROMPT.png``.

NNNNN is one more than the highest number any file name in the day's folder starts with. The
PNG is written to a hidden temporary file, fsynced, then renamed into place, so a crash never
leaves a partial image under a real name. Numbering and renaming happen under a lock (a thread
lock, plus ``flock`` on the folder where POSIX has it, for a second process), so two concurrent
saves never take the same number.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

try:
    import fcntl
except ImportError:  # Windows: the thread lock alone guards numbering
    fcntl = None

# A1111's forbidden characters ('#' breaks URLs to the file); path separators are among them.
INVALID_CHARS = frozenset('#<>:"/\\|?*')
# Whole-name limit in UTF-8 bytes: well under the 255 of common file systems, and near A1111's
# 128-character prompt part for ASCII prompts.
MAX_NAME_BYTES = 140

_thread_lock = threading.Lock()


def sanitize_filename_part(text: str) -> str:
    """The text made safe inside a file name, A1111-style (spaces kept, bad characters → "_")."""
    text = re.sub(r"\s+", " ", text)
    text = "".join("_" if c in INVALID_CHARS or unicodedata.category(c).startswith("C") else c for c in text)
    # No leading spaces, and no trailing spaces or dots (Windows drops those).
    return text.lstrip(" ").rstrip(" .")


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[: max(max_bytes, 0)].decode("utf-8", errors="ignore")


def file_name(number: int, seed: int, prompt: str) -> str:
    """``NNNNN-SEED-PROMPT.png``, the prompt part cut to keep the name within MAX_NAME_BYTES."""
    stem = f"{number:05}-{seed}"
    budget = MAX_NAME_BYTES - len(f"{stem}-.png")
    prompt_part = _truncate_utf8(sanitize_filename_part(prompt), budget).rstrip(" .")
    return f"{stem}-{prompt_part}.png" if prompt_part else f"{stem}.png"


def next_number(folder: Path) -> int:
    """One more than the highest leading number of a name in ``folder`` ("00041-..." → 42), or 0."""
    numbers = []
    for name in os.listdir(folder):
        head = os.path.splitext(name)[0].split("-")[0]
        if head.isascii() and head.isdigit():
            numbers.append(int(head))
    return max(numbers, default=-1) + 1


TEMP_PNG = re.compile(r"\.[0-9a-f]{16}\.png\.tmp")  # what _write_temp_png names its files


def remove_stale_temp_files(outdir: Path) -> int:
    """Delete the hidden half-written PNGs a killed process left under ``outdir`` (no finished image is ever
    one of them: a save renames its file into place only once it is complete). Returns how many."""
    stale = [p for p in Path(outdir).rglob(".*.png.tmp") if TEMP_PNG.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The image as a PNG file's bytes, with its infotext in A1111's ``parameters`` text chunk (none if empty)."""
    pnginfo = PngInfo()
    if infotext:
        pnginfo.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def png_files(images: list[Image.Image], infotexts: list[str]) -> list[bytes]:
    """``png_bytes`` of each, side by side: Pillow's encoder lets other threads run (a 1024² PNG takes 0.1-0.2 s
    of CPU; a batch takes about one image's time on enough cores)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(images), os.cpu_count() or 1))) as pool:
        return list(pool.map(png_bytes, images, infotexts))


def _write_temp_png(png: bytes, folder: Path) -> Path:
    """A PNG file's bytes as a hidden, fsynced file in ``folder``; created like a normal file (umask applies)."""
    path = folder / f".{secrets.token_hex(8)}.png.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(png)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[int | None]:
    """Hold the save lock for ``folder``; yields the folder's descriptor where POSIX gives one."""
    with _thread_lock:
        dir_fd = os.open(folder, os.O_RDONLY) if fcntl else None
        try:
            if dir_fd is not None:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
            yield dir_fd
        finally:
            if dir_fd is not None:
                os.close(dir_fd)


def save_image(
    image: Image.Image,
    outdir: Path,
    seed: int,
    prompt: str,
    infotext: str,
    date: datetime.date | None = None,
    png: bytes | None = None,
) -> Path:
    """Save ``image`` with its infotext as the day's next numbered PNG (``png``: its bytes, encoded already by
    ``png_files``); returns its path."""
    folder = Path(outdir) / (date or datetime.date.today()).isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    temp = _write_temp_png(png_bytes(image, infotext) if png is None else png, folder)
    try:
        with _folder_locked(folder) as dir_fd:
            path = folder / file_name(next_number(folder), seed, prompt)
            os.replace(temp, path)
            if dir_fd is not None:
                os.fsync(dir_fd)  # make the rename itself durable
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path
