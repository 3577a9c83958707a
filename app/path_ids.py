"""The ids in route paths, as the OpenAPI document describes them: opaque strings with a type
prefix (``service_core.public_ids``). No pattern is enforced here: a malformed id is answered
like an unknown one (404), not as a validation error, so that nothing tells them apart."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from app.schemas import CORPUS_EXAMPLE, JOB_EXAMPLE, LINEAGE_EXAMPLE

LineagePath = Annotated[str, Path(description="a lineage id (`lin_…`)", examples=[LINEAGE_EXAMPLE])]
JobPath = Annotated[str, Path(description="a job id (`job_…`)", examples=[JOB_EXAMPLE])]
CorpusPath = Annotated[str, Path(description="a corpus id (`cor_…`)", examples=[CORPUS_EXAMPLE])]
KeyPath = Annotated[
    str, Path(description="an API key id (`key_…`)", examples=["key_5tYh2WcN8qZr0LmB3dXe"])
]
WebhookPath = Annotated[
    str,
    Path(description="a webhook endpoint id (`whk_…`)", examples=["whk_2JdW9kLq4RtX7vBn0PyS"]),
]
