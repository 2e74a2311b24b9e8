"""Keyframe previews for watchers (WatchStory with include_previews): small PNG thumbnails of the
keyframes a shot added to its story's memory.

Its own module because it is the daemon's one use of PIL: imported when a watcher asks for
previews, never at start-up, so the parent process stays free of image libraries until then.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

from storyfarm.story.numbering import keyframe_indices
from storyfarm.v1 import render_pb2 as pb

PREVIEW_PX = 160


def keyframe_previews(story_dir: Path, record, shot_index: int) -> Iterator[pb.KeyframePreview]:
    """A thumbnail of every keyframe shot `shot_index` of `record` added (those still on disk)."""
    from PIL import Image

    shot = next((s for s in record.shots if s.index == shot_index), None)
    for kid in (shot.result or {}).get("new_keyframes", []) if shot else []:
        path = story_dir / "keyframes" / f"{kid}.png"
        if not path.is_file():
            continue
        with Image.open(path) as image:
            image.thumbnail((PREVIEW_PX, PREVIEW_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            frame = (keyframe_indices(kid) or (shot_index, 0))[1]  # the wire's frame_index counts from 0
            yield pb.KeyframePreview(keyframe_id=kid, shot_index=shot_index, frame_index=frame, image=buffer.getvalue(),
                                     content_type="image/png", width=image.width, height=image.height)
