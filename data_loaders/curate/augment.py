"""Caption augmentation: several captions per clip, deterministic per clip id.

The list holds the caption itself, a summary (its first sentence, at most ``summary_words`` words),
random combinations of the caption with the clip's known cinematography and style attributes, and
the translations a ``translate`` hook returns for each language.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Any, Callable, Optional, Sequence

ATTRIBUTE_PHRASES = {
    "camera_motion": "camera: {}",
    "shot_size": "shot size: {}",
    "lens": "lens: {}",
    "style": "style: {}",
    "colour_tone": "colour tone: {}",
}


def summarize(caption: str, summary_words: int = 12) -> str:
    first = re.split(r"(?<=[.!?])\s+", caption.strip(), maxsplit=1)[0].rstrip(".!? ")
    words = first.split()
    return " ".join(words[:summary_words])


def augment_captions(row: dict[str, Any], seed: int = 0, combinations: int = 2,
                     translate: Optional[Callable[[str, str], str]] = None, langs: Sequence[str] = ()) -> list[str]:
    caption = str(row["caption"]).strip()
    out = [caption]
    short = summarize(caption)
    if short and short != caption.rstrip(". "):
        out.append(short)
    attrs = [ATTRIBUTE_PHRASES[k].format(row[k]) for k in ATTRIBUTE_PHRASES
             if isinstance(row.get(k), str) and row[k] not in ("", "unknown")]
    rng = random.Random(zlib.crc32(f"{seed}:{row['clip_id']}".encode()))
    for _ in range(combinations if attrs else 0):
        pick = rng.sample(attrs, rng.randint(1, len(attrs)))
        text = f"{caption.rstrip('. ')}; {', '.join(pick)}"
        if text not in out:
            out.append(text)
    for lang in langs if translate else ():
        t = str(translate(caption, lang)).strip()  # type: ignore[misc]
        if t and t not in out:
            out.append(t)
    return out
