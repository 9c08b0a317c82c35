"""A1111's prompt styles: a ``styles.csv`` of named prompt / negative prompt pieces, applied by name.

The file has a header row ``name,prompt,negative_prompt`` (A1111's older files call the prompt column
``text``). A style's prompt containing ``{prompt}`` is a template the user's prompt is put into; any other
style prompt is appended after a comma, as A1111's ``modules/styles.py`` merges them.
"""

from __future__ import annotations

import csv
import os
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_STYLES_BYTES = 8 << 20  # a styles file is text someone wrote; far beyond that it is not one


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str

    def as_item(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """``prompt`` put into a style: into its ``{prompt}``, else the style after a comma."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


class StyleDatabase:
    """The styles of one CSV file, re-read when it changes on disk; no file: no styles."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        if self.path is not None and not self.path.is_file():
            raise FileNotFoundError(f"--styles-file {self.path}: no such file")
        self._styles: dict[str, PromptStyle] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def styles(self) -> dict[str, PromptStyle]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as e:
                raise ValueError(f"styles file {self.path} cannot be read ({e})") from None
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._styles = read_styles(self.path)
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._styles

    def apply(self, names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompts with the named styles applied in order; KeyError naming an unknown style."""
        styles = self.styles()
        for name in names:
            style = styles.get(name)
            if style is None:
                known = ", ".join(repr(n) for n in styles) or "none (start the server with --styles-file styles.csv)"
                raise KeyError(f"no prompt style {name!r}; styles: {known}")
            prompt = merge_prompts(style.prompt, prompt)
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt


def read_styles(path: Path) -> dict[str, PromptStyle]:
    """The styles in an A1111 ``styles.csv`` (ValueError naming the file if it is not one)."""
    if path.stat().st_size > MAX_STYLES_BYTES:
        raise ValueError(f"styles file {path} is larger than {MAX_STYLES_BYTES >> 20} MB; is it a styles.csv?")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"styles file {path} is not a UTF-8 CSV file ({e})") from None
    styles: dict[str, PromptStyle] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name:
            continue
        prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text")
        styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    return styles
