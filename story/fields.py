"""Field readers for story files: one per kind of value, all reporting into a FieldErrors log.

Story files come from users and pipelines, so every reader takes whatever a parser produced
(json.loads, yaml.safe_load or a caller's dict) and returns a clean value or records an error
and returns None; no reader raises. Invariants:
- nothing is coerced: "false" is not a boolean, 0 and 1 are not booleans, true is not an integer,
  81.0 is not a frame count, NaN and infinities are not numbers;
- every error names the field path as written (`scenes[1].cut[0]`, `shots[3].seed`) and is one
  line; values are quoted with control, bidi and surrogate characters escaped, so an error can be
  printed or logged without reshaping the terminal or the log line;
- text that reaches the model (prompts) has no control characters but newline and tab, no bidi
  overrides (U+202A-U+202E, U+2066-U+2069, which make text read differently than it renders)
  and no unpaired surrogates (they cannot be encoded to UTF-8 downstream).
Pure Python: no torch.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import unicodedata
from typing import Any, Iterable, Mapping, NamedTuple

MAX_PROMPT_CHARS = 4000
MAX_NAME_CHARS = 200
MAX_REFERENCES = 64
MAX_PATH_CHARS = 4096
# Beyond this, further errors are counted, not listed: one bad 1 MiB file must not yield a
# message of tens of megabytes.
MAX_REPORTED_ERRORS = 100

_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f"  # Cc without tab (\x09) and newline (\x0a)
_BIDI = "\u202a-\u202e\u2066-\u2069"
_BIDI_MARKS = "\u200e\u200f\u061c"  # LRM, RLM, ALM: invisible, they reorder neighbouring text
_TAGS = "\U000e0000-\U000e007f"  # invisible tag characters: text a person cannot see in a prompt
_SURROGATE = "\ud800-\udfff"
_INVISIBLE = f"{_BIDI}{_BIDI_MARKS}{_TAGS}{_SURROGATE}"
_FORBIDDEN_MULTILINE = re.compile(f"[{_CONTROL}{_INVISIBLE}]")
_FORBIDDEN_ONE_LINE = re.compile(f"[\t\n{_CONTROL}{_INVISIBLE}]")
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_RESOLUTION_TEXT = re.compile(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*")


class FieldError(NamedTuple):
    """One problem in a story: where it was written ("" = the whole document) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class StoryValidationError(ValueError):
    """A story that cannot be used, with every problem found; str() gives one line per error."""

    def __init__(self, errors: Iterable[FieldError], source: str = "<inline>"):
        self.errors: list[FieldError] = list(errors)
        self.source = source
        super().__init__("\n".join(str(error) for error in self.errors))

    def __reduce__(self):  # picklable across worker processes despite the custom signature
        return (type(self), (self.errors, self.source))


class FieldErrors:
    """The errors found so far, in the order found; exact repeats are kept once."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []
        self._seen: set[FieldError] = set()

    def add(self, path: str, message: str) -> None:
        error = FieldError(path, message)
        if error not in self._seen:
            self._seen.add(error)
            self.items.append(error)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, source: str) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_ERRORS]
        if len(self.items) > MAX_REPORTED_ERRORS:
            shown.append(FieldError("", f"... and {len(self.items) - MAX_REPORTED_ERRORS} more errors"))
        raise StoryValidationError(shown, source)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _escaped(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif unicodedata.category(ch) in _UNPRINTABLE_CATEGORIES:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def describe(value: Any, limit: int = 60) -> str:
    """A value as an error message shows it: JSON-like, short, printable."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + _escaped(value if len(value) <= limit else value[:limit] + "...") + '"'
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a value of type {type(value).__name__}"


def child(path: str, key: Any) -> str:
    """The path of `key` (a list index or a mapping key) inside `path`, Python-style."""
    if is_int(key):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.isidentifier() and len(key) <= 60:
        return f"{path}.{key}" if path else key
    return f"{path}[{describe(key)}]"


def check_keys(mapping: dict, path: str, allowed: tuple[str, ...], errors: FieldErrors,
               aliases: Mapping[str, str] | None = None) -> None:
    """Unknown keys are errors (typo protection), with the allowed keys and a likely intended one:
    a close spelling, or what `aliases` maps the key to (another format's name for the same thing,
    which spelling alone does not find: `story_name` is `name`)."""
    for key in mapping:
        if key in allowed:
            continue
        hint = ""
        if isinstance(key, str):
            meant = (aliases or {}).get(key)
            close = [meant] if meant in allowed else difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
            hint = f'; did you mean "{close[0]}"?' if close else ""
        errors.add(child(path, key), f"unknown key; allowed: {', '.join(allowed)}{hint}")


def read_text(value: Any, path: str, errors: FieldErrors, *, limit: int = MAX_PROMPT_CHARS,
              allow_empty: bool = False, one_line: bool = False) -> str | None:
    if not isinstance(value, str):
        errors.add(path, f"expected a string, got {describe(value)}")
        return None
    ok = True
    if not allow_empty and not value.strip():
        errors.add(path, "must not be empty or whitespace")
        ok = False
    if len(value) > limit:
        errors.add(path, f"is {len(value)} characters long; the limit is {limit}")
        ok = False
    bad = (_FORBIDDEN_ONE_LINE if one_line else _FORBIDDEN_MULTILINE).search(value)
    if bad:
        ch, where = bad.group(), f"(U+{ord(bad.group()):04X}) at position {bad.start()}"
        if "\ud800" <= ch <= "\udfff":
            errors.add(path, f"contains an unpaired surrogate {where}")
        elif "\u202a" <= ch <= "\u202e" or "\u2066" <= ch <= "\u2069":
            errors.add(path, f"contains a Unicode bidirectional override {where}")
        elif ch in _BIDI_MARKS:
            errors.add(path, f"contains an invisible Unicode bidirectional mark {where}")
        elif "\U000e0000" <= ch <= "\U000e007f":
            errors.add(path, f"contains an invisible Unicode tag character {where}")
        else:
            allowed = "none are allowed here" if one_line else "only newline and tab are allowed"
            errors.add(path, f"contains a control character {where}; {allowed}")
        ok = False
    # NFC: the same words typed on two systems (composed vs decomposed accents) are the same
    # prompt, so they tokenise alike and share cached text embeddings.
    return unicodedata.normalize("NFC", value) if ok else None


def read_bool(value: Any, path: str, errors: FieldErrors) -> bool | None:
    if isinstance(value, bool):
        return value
    errors.add(path, f"expected a boolean, got {describe(value)}")
    return None


def read_int(value: Any, path: str, errors: FieldErrors, *, minimum: int,
             below: int | None = None, below_text: str = "") -> int | None:
    """An integer >= minimum (and < below when given)."""
    if not is_int(value) or value < minimum:
        errors.add(path, f"expected an integer >= {minimum}, got {describe(value)}")
        return None
    if below is not None and value >= below:
        errors.add(path, f"expected an integer < {below_text or below}, got {describe(value)}")
        return None
    return value


def read_number(value: Any, path: str, errors: FieldErrors, *, minimum: float = 0.0,
                strict: bool = True, what: str = "a number") -> float | None:
    """A finite int or float above `minimum` (or at least it when not strict), as a float."""
    bound = f"{'>' if strict else '>='} {minimum:g}"
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    if number is None or not math.isfinite(number) or number < minimum or (strict and number == minimum):
        errors.add(path, f"expected {what} {bound}, got {describe(value)}")
        return None
    return number


def read_choice(value: Any, path: str, errors: FieldErrors, allowed: tuple[str, ...],
                not_yet: tuple[str, ...] = ()) -> str | None:
    if isinstance(value, str) and value in allowed:
        return value
    if isinstance(value, str) and value in not_yet:
        errors.add(path, f"{describe(value)} is not available yet; allowed: {', '.join(allowed)}")
    else:
        errors.add(path, f"expected one of: {', '.join(allowed)}, got {describe(value)}")
    return None


def read_resolution(value: Any, path: str, errors: FieldErrors) -> tuple[int, int] | None:
    """"832x480" or [832, 480], width first."""
    if isinstance(value, str):
        match = _RESOLUTION_TEXT.fullmatch(value)
        if match and int(match[1]) >= 1 and int(match[2]) >= 1:
            return int(match[1]), int(match[2])
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        width = read_int(value[0], f"{path}[0]", errors, minimum=1)
        height = read_int(value[1], f"{path}[1]", errors, minimum=1)
        return (width, height) if width is not None and height is not None else None
    errors.add(path, f'expected "WIDTHxHEIGHT" (e.g. "832x480") or [width, height], got {describe(value)}')
    return None


def read_guidance(value: Any, path: str, errors: FieldErrors) -> tuple[float, float] | None:
    """One number for both experts, or a [high_noise, low_noise] pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        high = read_number(value[0], f"{path}[0]", errors, strict=False)
        low = read_number(value[1], f"{path}[1]", errors, strict=False)
        return (high, low) if high is not None and low is not None else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        scale = read_number(value, path, errors, strict=False)
        return None if scale is None else (scale, scale)
    errors.add(path, f"expected a number >= 0 or a [high_noise, low_noise] pair, got {describe(value)}")
    return None


def read_references(value: Any, path: str, errors: FieldErrors, base_dir: str) -> tuple[str, ...] | None:
    """Image paths, relative to the story file's folder, that exist as files; returned absolute."""
    if not isinstance(value, (list, tuple)):
        errors.add(path, f"expected a list of image paths, got {describe(value)}")
        return None
    if len(value) > MAX_REFERENCES:
        errors.add(path, f"has {len(value)} images; the limit is {MAX_REFERENCES}")
        return None
    resolved: list[str] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if not isinstance(item, str) or not item.strip():
            errors.add(item_path, f"expected an image path, got {describe(item)}")
        elif "\x00" in item:
            errors.add(item_path, "contains a NUL character")
        elif len(item) > MAX_PATH_CHARS:
            errors.add(item_path, f"is {len(item)} characters long; the limit is {MAX_PATH_CHARS}")
        else:
            absolute = os.path.abspath(os.path.join(base_dir, item))
            if os.path.isfile(absolute):
                resolved.append(absolute)
            elif os.path.exists(absolute):
                errors.add(item_path, f"not a file: {describe(absolute, limit=300)}")
            else:
                errors.add(item_path, f"file not found: {describe(absolute, limit=300)}")
    return tuple(resolved) if len(resolved) == len(value) else None
