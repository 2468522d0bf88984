"""The base of every job-file section: an unknown key is refused (a typo must not pass as a default), and a
parsed job is frozen, so no code changes the settings it was started with."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
