"""DownloadArtifact's stream: one version of one artifact, from any offset, in 1 MiB chunks.

Its own module because the version rules are the point of the RPC, not translation: a worker
publishes a take's files before the job store records them, so during a re-render the file under a
name can be newer than what the store (and a client resuming) calls that artifact. The stream
therefore opens the file only when its bytes are the recorded version (ArtifactStore.open_version),
names that version (size and sha256) in every chunk, and refuses a resume pinned to another one.
Either refusal is ABORTED with reason ARTIFACT_CHANGED and the current sha256 in its metadata: the
client starts that file again from byte 0 (after the RetryInfo when the new take is still being
recorded). A stream once started is never switched: it reads one open file to its end.
"""

from __future__ import annotations

import functools
from typing import Iterator

import grpc

from storyfarm.daemon import convert
from storyfarm.daemon.artifacts import ArtifactChanged, ArtifactError, ArtifactStore, OffsetOutOfRange
from storyfarm.daemon.errors import RpcError, not_found
from storyfarm.v1 import render_pb2 as pb

CHUNK_BYTES = 1 << 20
REPUBLISH_RETRY_S = 0.5  # a take's files are recorded once its worker reports: about this soon


def artifact_chunks(artifacts: ArtifactStore, record, request: pb.DownloadArtifactRequest) -> Iterator[pb.ArtifactChunk]:
    """The chunks of `request.name` of the story `record`, from `request.offset`; RpcError when
    there is no such artifact, the offset is outside it, or its version is not the one expected."""
    artifact = next((a for a in record.artifacts if a.name == request.name), None)
    if artifact is None:
        raise not_found("artifact", f"{request.story_id}/{request.name}", "ARTIFACT_NOT_FOUND")
    changed = functools.partial(RpcError, grpc.StatusCode.ABORTED, reason="ARTIFACT_CHANGED",
                                metadata={"sha256": artifact.sha256})
    if request.expected_sha256 and request.expected_sha256 != artifact.sha256:
        raise changed(f"{request.name} was republished since the download started (now sha256 {artifact.sha256}); "
                      "download it again from byte 0", fields=[("expected_sha256", f"the artifact is now {artifact.sha256}")])
    try:
        handle, size = artifacts.open_version(request.story_id, request.name, artifact.sha256, request.offset)
    except OffsetOutOfRange as exc:
        raise RpcError(grpc.StatusCode.OUT_OF_RANGE, str(exc), "OFFSET_OUT_OF_RANGE", fields=[("offset", str(exc))]) from None
    except ArtifactChanged as exc:
        raise changed(f"{exc}; download it again from byte 0 once the new take is recorded",
                      retry_after=REPUBLISH_RETRY_S) from None
    except ArtifactError as exc:
        raise not_found("artifact", f"{request.story_id}/{request.name}", "ARTIFACT_NOT_FOUND") from exc
    with handle:
        offset, content_type = request.offset, convert.content_type(artifact.name)
        while True:  # at least one chunk: a resume at the very end still learns the size and sha256
            data = handle.read(CHUNK_BYTES)
            yield pb.ArtifactChunk(offset=offset, data=data, total_size=size, sha256=artifact.sha256,
                                   content_type=content_type)
            offset += len(data)
            if not data or offset >= size:
                return
