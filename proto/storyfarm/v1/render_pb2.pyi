import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORY_STATE_UNSPECIFIED: _ClassVar[StoryState]
    STORY_STATE_QUEUED: _ClassVar[StoryState]
    STORY_STATE_RUNNING: _ClassVar[StoryState]
    STORY_STATE_SUCCEEDED: _ClassVar[StoryState]
    STORY_STATE_FAILED: _ClassVar[StoryState]
    STORY_STATE_CANCELLED: _ClassVar[StoryState]
    STORY_STATE_PAUSED: _ClassVar[StoryState]

class ShotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHOT_STATE_UNSPECIFIED: _ClassVar[ShotState]
    SHOT_STATE_WAITING: _ClassVar[ShotState]
    SHOT_STATE_QUEUED: _ClassVar[ShotState]
    SHOT_STATE_RUNNING: _ClassVar[ShotState]
    SHOT_STATE_SUCCEEDED: _ClassVar[ShotState]
    SHOT_STATE_FAILED: _ClassVar[ShotState]
    SHOT_STATE_CANCELLED: _ClassVar[ShotState]
    SHOT_STATE_PAUSED: _ClassVar[ShotState]

class RenderStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RENDER_STAGE_UNSPECIFIED: _ClassVar[RenderStage]
    RENDER_STAGE_TEXT_ENCODE: _ClassVar[RenderStage]
    RENDER_STAGE_MEMORY_ENCODE: _ClassVar[RenderStage]
    RENDER_STAGE_DENOISE: _ClassVar[RenderStage]
    RENDER_STAGE_VAE_DECODE: _ClassVar[RenderStage]
    RENDER_STAGE_KEYFRAMES: _ClassVar[RenderStage]
    RENDER_STAGE_MP4_ENCODE: _ClassVar[RenderStage]
    RENDER_STAGE_ASSEMBLE: _ClassVar[RenderStage]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_SHOT_VIDEO: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_STORY_VIDEO: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_KEYFRAME: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_CONTACT_SHEET: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MANIFEST: _ClassVar[ArtifactKind]

class Transition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSITION_UNSPECIFIED: _ClassVar[Transition]
    TRANSITION_FIRST_FRAME: _ClassVar[Transition]
    TRANSITION_MOTION_FRAMES: _ClassVar[Transition]

class StoryView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORY_VIEW_UNSPECIFIED: _ClassVar[StoryView]
    STORY_VIEW_BASIC: _ClassVar[StoryView]
    STORY_VIEW_FULL: _ClassVar[StoryView]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_WARMING: _ClassVar[WorkerState]
    WORKER_STATE_IDLE: _ClassVar[WorkerState]
    WORKER_STATE_BUSY: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
    WORKER_STATE_STOPPED: _ClassVar[WorkerState]
    WORKER_STATE_FAILED: _ClassVar[WorkerState]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_STORY: _ClassVar[ErrorReason]
    INVALID_REFERENCE_IMAGE: _ClassVar[ErrorReason]
    RENDER_BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    INVALID_LABEL: _ClassVar[ErrorReason]
    UNKNOWN_PRESET: _ClassVar[ErrorReason]
    INVALID_PAGE_TOKEN: _ClassVar[ErrorReason]
    INVALID_BATCH_ID: _ClassVar[ErrorReason]
    IDEMPOTENCY_CONFLICT: _ClassVar[ErrorReason]
    QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    TOO_MANY_REQUESTS: _ClassVar[ErrorReason]
    STORY_NOT_FOUND: _ClassVar[ErrorReason]
    SHOT_NOT_FOUND: _ClassVar[ErrorReason]
    ARTIFACT_NOT_FOUND: _ClassVar[ErrorReason]
    BATCH_NOT_FOUND: _ClassVar[ErrorReason]
    WORKER_NOT_FOUND: _ClassVar[ErrorReason]
    STORY_FINISHED: _ClassVar[ErrorReason]
    SHOT_NOT_RETRYABLE: _ClassVar[ErrorReason]
    ARTIFACT_CHANGED: _ClassVar[ErrorReason]
    BATCH_CONFLICT: _ClassVar[ErrorReason]
    OFFSET_OUT_OF_RANGE: _ClassVar[ErrorReason]
    TOKEN_MISSING: _ClassVar[ErrorReason]
    TOKEN_INVALID: _ClassVar[ErrorReason]
    ROLE_REQUIRED: _ClassVar[ErrorReason]
    PROJECT_FORBIDDEN: _ClassVar[ErrorReason]
    SHUTTING_DOWN: _ClassVar[ErrorReason]
    STORE_BUSY: _ClassVar[ErrorReason]
    STORY_BUSY: _ClassVar[ErrorReason]
    INVALID_EDIT: _ClassVar[ErrorReason]
    INVALID_ARGUMENT: _ClassVar[ErrorReason]
STORY_STATE_UNSPECIFIED: StoryState
STORY_STATE_QUEUED: StoryState
STORY_STATE_RUNNING: StoryState
STORY_STATE_SUCCEEDED: StoryState
STORY_STATE_FAILED: StoryState
STORY_STATE_CANCELLED: StoryState
STORY_STATE_PAUSED: StoryState
SHOT_STATE_UNSPECIFIED: ShotState
SHOT_STATE_WAITING: ShotState
SHOT_STATE_QUEUED: ShotState
SHOT_STATE_RUNNING: ShotState
SHOT_STATE_SUCCEEDED: ShotState
SHOT_STATE_FAILED: ShotState
SHOT_STATE_CANCELLED: ShotState
SHOT_STATE_PAUSED: ShotState
RENDER_STAGE_UNSPECIFIED: RenderStage
RENDER_STAGE_TEXT_ENCODE: RenderStage
RENDER_STAGE_MEMORY_ENCODE: RenderStage
RENDER_STAGE_DENOISE: RenderStage
RENDER_STAGE_VAE_DECODE: RenderStage
RENDER_STAGE_KEYFRAMES: RenderStage
RENDER_STAGE_MP4_ENCODE: RenderStage
RENDER_STAGE_ASSEMBLE: RenderStage
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_SHOT_VIDEO: ArtifactKind
ARTIFACT_KIND_STORY_VIDEO: ArtifactKind
ARTIFACT_KIND_KEYFRAME: ArtifactKind
ARTIFACT_KIND_CONTACT_SHEET: ArtifactKind
ARTIFACT_KIND_MANIFEST: ArtifactKind
TRANSITION_UNSPECIFIED: Transition
TRANSITION_FIRST_FRAME: Transition
TRANSITION_MOTION_FRAMES: Transition
STORY_VIEW_UNSPECIFIED: StoryView
STORY_VIEW_BASIC: StoryView
STORY_VIEW_FULL: StoryView
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_WARMING: WorkerState
WORKER_STATE_IDLE: WorkerState
WORKER_STATE_BUSY: WorkerState
WORKER_STATE_DRAINING: WorkerState
WORKER_STATE_STOPPED: WorkerState
WORKER_STATE_FAILED: WorkerState
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_STORY: ErrorReason
INVALID_REFERENCE_IMAGE: ErrorReason
RENDER_BUDGET_EXCEEDED: ErrorReason
INVALID_LABEL: ErrorReason
UNKNOWN_PRESET: ErrorReason
INVALID_PAGE_TOKEN: ErrorReason
INVALID_BATCH_ID: ErrorReason
IDEMPOTENCY_CONFLICT: ErrorReason
QUOTA_EXCEEDED: ErrorReason
TOO_MANY_REQUESTS: ErrorReason
STORY_NOT_FOUND: ErrorReason
SHOT_NOT_FOUND: ErrorReason
ARTIFACT_NOT_FOUND: ErrorReason
BATCH_NOT_FOUND: ErrorReason
WORKER_NOT_FOUND: ErrorReason
STORY_FINISHED: ErrorReason
SHOT_NOT_RETRYABLE: ErrorReason
ARTIFACT_CHANGED: ErrorReason
BATCH_CONFLICT: ErrorReason
OFFSET_OUT_OF_RANGE: ErrorReason
TOKEN_MISSING: ErrorReason
TOKEN_INVALID: ErrorReason
ROLE_REQUIRED: ErrorReason
PROJECT_FORBIDDEN: ErrorReason
SHUTTING_DOWN: ErrorReason
STORE_BUSY: ErrorReason
STORY_BUSY: ErrorReason
INVALID_EDIT: ErrorReason
INVALID_ARGUMENT: ErrorReason

class SubmitStoryRequest(_message.Message):
    __slots__ = ("request_id", "story_json", "story_yaml", "story_spec", "reference_images", "project", "priority", "labels", "deadline_time", "preset", "validate_only", "default_name")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STORY_JSON_FIELD_NUMBER: _ClassVar[int]
    STORY_YAML_FIELD_NUMBER: _ClassVar[int]
    STORY_SPEC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_TIME_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    story_json: str
    story_yaml: str
    story_spec: StorySpec
    reference_images: _containers.RepeatedCompositeFieldContainer[ReferenceImage]
    project: str
    priority: int
    labels: _containers.ScalarMap[str, str]
    deadline_time: _timestamp_pb2.Timestamp
    preset: str
    validate_only: bool
    default_name: str
    def __init__(self, request_id: _Optional[str] = ..., story_json: _Optional[str] = ..., story_yaml: _Optional[str] = ..., story_spec: _Optional[_Union[StorySpec, _Mapping]] = ..., reference_images: _Optional[_Iterable[_Union[ReferenceImage, _Mapping]]] = ..., project: _Optional[str] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., deadline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., preset: _Optional[str] = ..., validate_only: _Optional[bool] = ..., default_name: _Optional[str] = ...) -> None: ...

class ReferenceImage(_message.Message):
    __slots__ = ("name", "data", "content_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    content_type: str
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class StorySpec(_message.Message):
    __slots__ = ("name", "overview", "seed", "references", "defaults", "shots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OVERVIEW_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    overview: str
    seed: int
    references: _containers.RepeatedScalarFieldContainer[str]
    defaults: RenderSettings
    shots: _containers.RepeatedCompositeFieldContainer[ShotSpec]
    def __init__(self, name: _Optional[str] = ..., overview: _Optional[str] = ..., seed: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ..., defaults: _Optional[_Union[RenderSettings, _Mapping]] = ..., shots: _Optional[_Iterable[_Union[ShotSpec, _Mapping]]] = ...) -> None: ...

class ShotSpec(_message.Message):
    __slots__ = ("prompt", "first_frame_prompt", "scene", "cut", "transition", "seed", "references", "settings")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    first_frame_prompt: str
    scene: int
    cut: bool
    transition: Transition
    seed: int
    references: _containers.RepeatedScalarFieldContainer[str]
    settings: RenderSettings
    def __init__(self, prompt: _Optional[str] = ..., first_frame_prompt: _Optional[str] = ..., scene: _Optional[int] = ..., cut: _Optional[bool] = ..., transition: _Optional[_Union[Transition, str]] = ..., seed: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[RenderSettings, _Mapping]] = ...) -> None: ...

class RenderSettings(_message.Message):
    __slots__ = ("negative_prompt", "duration", "frames", "resolution", "steps", "guidance", "shift")
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    negative_prompt: str
    duration: _duration_pb2.Duration
    frames: int
    resolution: Resolution
    steps: int
    guidance: Guidance
    shift: float
    def __init__(self, negative_prompt: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., frames: _Optional[int] = ..., resolution: _Optional[_Union[Resolution, _Mapping]] = ..., steps: _Optional[int] = ..., guidance: _Optional[_Union[Guidance, _Mapping]] = ..., shift: _Optional[float] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Guidance(_message.Message):
    __slots__ = ("high_noise", "low_noise")
    HIGH_NOISE_FIELD_NUMBER: _ClassVar[int]
    LOW_NOISE_FIELD_NUMBER: _ClassVar[int]
    high_noise: float
    low_noise: float
    def __init__(self, high_noise: _Optional[float] = ..., low_noise: _Optional[float] = ...) -> None: ...

class SubmitStoryResponse(_message.Message):
    __slots__ = ("story_id", "created", "shot_count", "warnings")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    SHOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    created: bool
    shot_count: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, story_id: _Optional[str] = ..., created: _Optional[bool] = ..., shot_count: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class Story(_message.Message):
    __slots__ = ("story_id", "name", "project", "state", "priority", "labels", "batch_id", "request_id", "preset", "create_time", "update_time", "finish_time", "deadline_time", "error", "shot_count", "succeeded_shot_count", "shots", "artifacts", "eta", "waiting_reason")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_SHOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    name: str
    project: str
    state: StoryState
    priority: int
    labels: _containers.ScalarMap[str, str]
    batch_id: str
    request_id: str
    preset: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    finish_time: _timestamp_pb2.Timestamp
    deadline_time: _timestamp_pb2.Timestamp
    error: str
    shot_count: int
    succeeded_shot_count: int
    shots: _containers.RepeatedCompositeFieldContainer[Shot]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    eta: _duration_pb2.Duration
    waiting_reason: str
    def __init__(self, story_id: _Optional[str] = ..., name: _Optional[str] = ..., project: _Optional[str] = ..., state: _Optional[_Union[StoryState, str]] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., batch_id: _Optional[str] = ..., request_id: _Optional[str] = ..., preset: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., shot_count: _Optional[int] = ..., succeeded_shot_count: _Optional[int] = ..., shots: _Optional[_Iterable[_Union[Shot, _Mapping]]] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., waiting_reason: _Optional[str] = ...) -> None: ...

class Shot(_message.Message):
    __slots__ = ("index", "scene", "shot", "prompt", "cut", "state", "attempts", "worker", "error", "retryable", "progress", "seed", "start_time", "finish_time", "take")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    SHOT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    index: int
    scene: int
    shot: int
    prompt: str
    cut: bool
    state: ShotState
    attempts: int
    worker: str
    error: str
    retryable: bool
    progress: ShotProgress
    seed: int
    start_time: _timestamp_pb2.Timestamp
    finish_time: _timestamp_pb2.Timestamp
    take: int
    def __init__(self, index: _Optional[int] = ..., scene: _Optional[int] = ..., shot: _Optional[int] = ..., prompt: _Optional[str] = ..., cut: _Optional[bool] = ..., state: _Optional[_Union[ShotState, str]] = ..., attempts: _Optional[int] = ..., worker: _Optional[str] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ..., progress: _Optional[_Union[ShotProgress, _Mapping]] = ..., seed: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., take: _Optional[int] = ...) -> None: ...

class ShotProgress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "eta")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    stage: RenderStage
    step: int
    total_steps: int
    eta: _duration_pb2.Duration
    def __init__(self, stage: _Optional[_Union[RenderStage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "kind", "size", "sha256", "shot_index", "content_type", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ArtifactKind
    size: int
    sha256: str
    shot_index: int
    content_type: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., shot_index: _Optional[int] = ..., content_type: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetStoryRequest(_message.Message):
    __slots__ = ("story_id", "view")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    view: StoryView
    def __init__(self, story_id: _Optional[str] = ..., view: _Optional[_Union[StoryView, str]] = ...) -> None: ...

class ListStoriesRequest(_message.Message):
    __slots__ = ("project", "states", "batch_id", "labels", "page_size", "page_token", "view")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    project: str
    states: _containers.RepeatedScalarFieldContainer[StoryState]
    batch_id: str
    labels: _containers.ScalarMap[str, str]
    page_size: int
    page_token: str
    view: StoryView
    def __init__(self, project: _Optional[str] = ..., states: _Optional[_Iterable[_Union[StoryState, str]]] = ..., batch_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[StoryView, str]] = ...) -> None: ...

class ListStoriesResponse(_message.Message):
    __slots__ = ("stories", "next_page_token")
    STORIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    stories: _containers.RepeatedCompositeFieldContainer[Story]
    next_page_token: str
    def __init__(self, stories: _Optional[_Iterable[_Union[Story, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelStoryRequest(_message.Message):
    __slots__ = ("story_id", "reason")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    reason: str
    def __init__(self, story_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseStoryRequest(_message.Message):
    __slots__ = ("story_id",)
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    def __init__(self, story_id: _Optional[str] = ...) -> None: ...

class ResumeStoryRequest(_message.Message):
    __slots__ = ("story_id",)
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    def __init__(self, story_id: _Optional[str] = ...) -> None: ...

class SetPriorityRequest(_message.Message):
    __slots__ = ("story_id", "priority")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    priority: int
    def __init__(self, story_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class RetryShotRequest(_message.Message):
    __slots__ = ("story_id", "shot_index", "rerender", "seed")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    RERENDER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    shot_index: int
    rerender: bool
    seed: int
    def __init__(self, story_id: _Optional[str] = ..., shot_index: _Optional[int] = ..., rerender: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class RerenderShotRequest(_message.Message):
    __slots__ = ("story_id", "shot_index", "prompt", "strength", "seed", "cascade", "request_id")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    shot_index: int
    prompt: str
    strength: float
    seed: int
    cascade: bool
    request_id: str
    def __init__(self, story_id: _Optional[str] = ..., shot_index: _Optional[int] = ..., prompt: _Optional[str] = ..., strength: _Optional[float] = ..., seed: _Optional[int] = ..., cascade: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class WatchStoryRequest(_message.Message):
    __slots__ = ("story_id", "after_seq", "include_previews")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    after_seq: int
    include_previews: bool
    def __init__(self, story_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., include_previews: _Optional[bool] = ...) -> None: ...

class StoryEvent(_message.Message):
    __slots__ = ("seq", "time", "story_id", "snapshot", "story_state_changed", "shot_state_changed", "progress", "keyframe_preview", "artifact_published", "heartbeat", "batch_snapshot")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORY_STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    SHOT_STATE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    KEYFRAME_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    story_id: str
    snapshot: Snapshot
    story_state_changed: StoryStateChanged
    shot_state_changed: ShotStateChanged
    progress: Progress
    keyframe_preview: KeyframePreview
    artifact_published: ArtifactPublished
    heartbeat: Heartbeat
    batch_snapshot: Batch
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., story_id: _Optional[str] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., story_state_changed: _Optional[_Union[StoryStateChanged, _Mapping]] = ..., shot_state_changed: _Optional[_Union[ShotStateChanged, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., keyframe_preview: _Optional[_Union[KeyframePreview, _Mapping]] = ..., artifact_published: _Optional[_Union[ArtifactPublished, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., batch_snapshot: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("story", "resync")
    STORY_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    story: Story
    resync: bool
    def __init__(self, story: _Optional[_Union[Story, _Mapping]] = ..., resync: _Optional[bool] = ...) -> None: ...

class StoryStateChanged(_message.Message):
    __slots__ = ("old_state", "new_state", "reason")
    OLD_STATE_FIELD_NUMBER: _ClassVar[int]
    NEW_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    old_state: StoryState
    new_state: StoryState
    reason: str
    def __init__(self, old_state: _Optional[_Union[StoryState, str]] = ..., new_state: _Optional[_Union[StoryState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ShotStateChanged(_message.Message):
    __slots__ = ("shot_index", "old_state", "new_state", "reason", "attempt", "worker", "retryable")
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OLD_STATE_FIELD_NUMBER: _ClassVar[int]
    NEW_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    shot_index: int
    old_state: ShotState
    new_state: ShotState
    reason: str
    attempt: int
    worker: str
    retryable: bool
    def __init__(self, shot_index: _Optional[int] = ..., old_state: _Optional[_Union[ShotState, str]] = ..., new_state: _Optional[_Union[ShotState, str]] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ..., worker: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("shot_index", "stage", "step", "total_steps", "shot_eta", "eta")
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SHOT_ETA_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    shot_index: int
    stage: RenderStage
    step: int
    total_steps: int
    shot_eta: _duration_pb2.Duration
    eta: _duration_pb2.Duration
    def __init__(self, shot_index: _Optional[int] = ..., stage: _Optional[_Union[RenderStage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., shot_eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class KeyframePreview(_message.Message):
    __slots__ = ("keyframe_id", "shot_index", "frame_index", "image", "content_type", "width", "height")
    KEYFRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    keyframe_id: str
    shot_index: int
    frame_index: int
    image: bytes
    content_type: str
    width: int
    height: int
    def __init__(self, keyframe_id: _Optional[str] = ..., shot_index: _Optional[int] = ..., frame_index: _Optional[int] = ..., image: _Optional[bytes] = ..., content_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ArtifactPublished(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class WatchBatchRequest(_message.Message):
    __slots__ = ("batch_id", "after_seq")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    after_seq: int
    def __init__(self, batch_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("server_time", "interval")
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    server_time: _timestamp_pb2.Timestamp
    interval: _duration_pb2.Duration
    def __init__(self, server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("story_id", "shot_index", "kinds", "page_size", "page_token")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    shot_index: int
    kinds: _containers.RepeatedScalarFieldContainer[ArtifactKind]
    page_size: int
    page_token: str
    def __init__(self, story_id: _Optional[str] = ..., shot_index: _Optional[int] = ..., kinds: _Optional[_Iterable[_Union[ArtifactKind, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("story_id", "name", "offset", "expected_sha256")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    name: str
    offset: int
    expected_sha256: str
    def __init__(self, story_id: _Optional[str] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ..., expected_sha256: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256", "content_type")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    content_type: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPoolResponse(_message.Message):
    __slots__ = ("workers", "stories_by_state", "shots_by_state", "draining")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    STORIES_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    SHOTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    stories_by_state: _containers.RepeatedCompositeFieldContainer[StoryStateCount]
    shots_by_state: _containers.RepeatedCompositeFieldContainer[ShotStateCount]
    draining: bool
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., stories_by_state: _Optional[_Iterable[_Union[StoryStateCount, _Mapping]]] = ..., shots_by_state: _Optional[_Iterable[_Union[ShotStateCount, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "host", "devices", "state", "resident_story_count", "current_shot", "progress", "preset", "memory_used_bytes", "memory_total_bytes", "error")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_STORY_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SHOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    state: WorkerState
    resident_story_count: int
    current_shot: ShotRef
    progress: ShotProgress
    preset: str
    memory_used_bytes: int
    memory_total_bytes: int
    error: str
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[WorkerState, str]] = ..., resident_story_count: _Optional[int] = ..., current_shot: _Optional[_Union[ShotRef, _Mapping]] = ..., progress: _Optional[_Union[ShotProgress, _Mapping]] = ..., preset: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ShotRef(_message.Message):
    __slots__ = ("story_id", "shot_index")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    shot_index: int
    def __init__(self, story_id: _Optional[str] = ..., shot_index: _Optional[int] = ...) -> None: ...

class StoryStateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: StoryState
    count: int
    def __init__(self, state: _Optional[_Union[StoryState, str]] = ..., count: _Optional[int] = ...) -> None: ...

class ShotStateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: ShotState
    count: int
    def __init__(self, state: _Optional[_Union[ShotState, str]] = ..., count: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_ids", "wait", "undrain")
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    wait: bool
    undrain: bool
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ..., wait: _Optional[bool] = ..., undrain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "running_shot_count", "workers")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SHOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    running_shot_count: int
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, draining: _Optional[bool] = ..., running_shot_count: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("batch_id", "stories", "project", "deadline_time", "labels", "validate_only")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STORIES_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_TIME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    stories: _containers.RepeatedCompositeFieldContainer[SubmitStoryRequest]
    project: str
    deadline_time: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    validate_only: bool
    def __init__(self, batch_id: _Optional[str] = ..., stories: _Optional[_Iterable[_Union[SubmitStoryRequest, _Mapping]]] = ..., project: _Optional[str] = ..., deadline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("batch", "stories")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    STORIES_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    stories: _containers.RepeatedCompositeFieldContainer[SubmitStoryResponse]
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., stories: _Optional[_Iterable[_Union[SubmitStoryResponse, _Mapping]]] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("batch_id", "reason")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    reason: str
    def __init__(self, batch_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("batch_id", "project", "deadline_time", "create_time", "story_count", "stories_by_state", "done", "eta")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STORY_COUNT_FIELD_NUMBER: _ClassVar[int]
    STORIES_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    project: str
    deadline_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    story_count: int
    stories_by_state: _containers.RepeatedCompositeFieldContainer[StoryStateCount]
    done: bool
    eta: _duration_pb2.Duration
    def __init__(self, batch_id: _Optional[str] = ..., project: _Optional[str] = ..., deadline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., story_count: _Optional[int] = ..., stories_by_state: _Optional[_Iterable[_Union[StoryStateCount, _Mapping]]] = ..., done: _Optional[bool] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
