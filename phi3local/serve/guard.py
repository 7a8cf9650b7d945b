"""score.py's optional guardrail: Azure AI Content Safety screens the prompt and the answer when configured.

On when CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY are set in the deployment's environment
(phi3local.safety.content_safety); PHI3LOCAL_CONTENT_SAFETY_THRESHOLD (default 4 of 0/2/4/6) is the
severity that blocks. Like Azure OpenAI's content filter:

    a blocked prompt        400, error code content_filter (nothing is generated)
    a blocked answer        200 with finish_reason content_filter and REFUSAL_TEXT instead of the answer
    a streamed answer       its prompt is screened; its text is sent as generated, so it is not screened
    the service unreachable 503 content_safety_unavailable (it fails closed: an unscreened answer is not sent)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from phi3local.safety.content_safety import ContentSafetyClient, ContentSafetyError
from phi3local.serve import protocol
from phi3local.serve.errors import ServeError

ENV_THRESHOLD = "PHI3LOCAL_CONTENT_SAFETY_THRESHOLD"
DEFAULT_THRESHOLD = 4  # "medium", the level Azure's default content filters block from
REFUSAL_TEXT = "I can't help with that: the answer was withheld by the content filter."


class ContentGuard:
    def __init__(self, client: ContentSafetyClient, threshold: int = DEFAULT_THRESHOLD):
        self.client = client
        self.threshold = threshold

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ContentGuard | None:
        client = ContentSafetyClient.from_env(environ)
        if client is None:
            return None
        raw = (environ.get(ENV_THRESHOLD) or "").strip()
        try:
            threshold = int(raw) if raw else DEFAULT_THRESHOLD
        except ValueError:
            threshold = -1
        if not 0 <= threshold <= 7:
            raise ServeError(f"environment variable {ENV_THRESHOLD}={raw!r} must be a severity 0..7 (0, 2, 4 or 6)")
        return cls(client, threshold)

    def _worst(self, text: str) -> tuple[str | None, int]:
        try:
            return self.client.analyze(text).worst
        except ContentSafetyError as e:
            raise protocol.RequestError(503, f"the content filter is unavailable: {e}", code="content_safety_unavailable",
                                        error_type="server_error") from None

    def check_prompt(self, messages: Sequence[Mapping[str, str]]) -> None:
        """Raise a 400 content_filter RequestError when the conversation so far is blocked."""
        category, severity = self._worst("\n".join(str(m.get("content", "")) for m in messages))
        if severity >= self.threshold:
            raise protocol.RequestError(400, f"the prompt was blocked by the content filter ({category} severity "
                                        f"{severity} >= {self.threshold})", param="messages", code="content_filter")

    def blocks(self, answer: str) -> bool:
        return self._worst(answer)[1] >= self.threshold
