"""The shared production-profile daemon's tokens and limits, importable by the tests that use it.

Four tokens cover the roles and projects (a viewer and a submitter of `film`, a submitter of `ads`,
an admin); the limits are small so that oversized input costs kilobytes, not megabytes.
"""

from __future__ import annotations

TOKENS = {  # name: (token, project, role)
    "viewer": ("sft_viewer-film-token", "film", "viewer"),
    "submitter": ("sft_submitter-film-token", "film", "submitter"),
    "other": ("sft_submitter-ads-token", "ads", "submitter"),
    "admin": ("sft_admin-token", "*", "admin"),
}
LIMITS = {"max_message_bytes": 262_144, "max_story_bytes": 65_536, "max_shots": 40, "max_references": 4,
          "max_reference_bytes": 131_072, "max_reference_pixels": 1_000_000, "max_prompt_chars": 500,
          "max_work": 160 * 96 * 17 * 8}  # the tiny preset's own shot is exactly the budget


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name][0]}")]
