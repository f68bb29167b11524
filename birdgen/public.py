"""Public mode: the app shared with strangers on a server (README, "Share your demo").

`BIRDGEN_PUBLIC=1` turns it on. Then the Train page and on-demand evaluation are off, no page
takes a server path, and every request has limits, each set by an environment variable:

    BIRDGEN_PUBLIC_MAX_IMAGES        images per request (default 16)
    BIRDGEN_PUBLIC_MAX_EVALUATIONS   network evaluations per request, all images together
                                     (default 1600 = 16 images × 100)
    BIRDGEN_PUBLIC_MAX_WAITING       requests that may wait for the generation queue; past it a
                                     request is told at once that the server is busy (default 8)
    BIRDGEN_PUBLIC_MAX_UPLOAD_MB     size of an uploaded picture (default 5; also pass
                                     --server.maxUploadSize to streamlit so that larger files
                                     never reach the app)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

PUBLIC_ENV = "BIRDGEN_PUBLIC"


class LimitError(ValueError):
    """A request over one of public mode's limits; the message names the limit."""


@dataclass(frozen=True)
class PublicLimits:
    max_images: int = 16
    max_evaluations: int = 1600
    max_waiting: int = 8
    max_upload_mb: int = 5

    @classmethod
    def from_environment(cls, environ=os.environ) -> "PublicLimits":
        values = {}
        for field in fields(cls):
            name = f"{PUBLIC_ENV}_{field.name.upper()}"
            text = environ.get(name)
            if text is None:
                continue
            try:
                values[field.name] = int(text)
            except ValueError:
                raise LimitError(f"{name}={text!r}: expected a whole number") from None
            if values[field.name] < 1:
                raise LimitError(f"{name}={text}: must be at least 1")
        return cls(**values)

    def check(self, images: int, evaluations_per_image: int) -> None:
        if images > self.max_images:
            raise LimitError(f"{images} images is more than this public server allows per request"
                             f" ({self.max_images})")
        total = images * evaluations_per_image
        if total > self.max_evaluations:
            raise LimitError(f"{images} images × {evaluations_per_image} network evaluations = {total:,} is more than"
                             f" this public server allows per request ({self.max_evaluations:,}): use fewer steps or"
                             " images")


def public_limits(environ=os.environ) -> PublicLimits | None:
    """The limits when public mode is on, else None."""
    if environ.get(PUBLIC_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    return PublicLimits.from_environment(environ)
