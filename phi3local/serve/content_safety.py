"""Azure AI Content Safety's text analysis over its REST API (urllib only: no SDK, no torch).

Part of the serving runtime (phi3local.serve): score.py's guardrail (guard.py) when configured, and
`phi3local safety` (an answer's harm severity beside the rule verdict). Off unless an endpoint is configured:

    CONTENT_SAFETY_ENDPOINT   https://<resource>.cognitiveservices.azure.com (the names the SDK's samples use)
    CONTENT_SAFETY_KEY        the resource's key (sent as Ocp-Apim-Subscription-Key; never stored by phi3local)

READ (Microsoft's REST reference, not run against Azure here): POST
{endpoint}/contentsafety/text:analyze?api-version=2023-10-01 with {"text", "categories", "outputType"};
the answer lists {"category", "severity"} per category in "categoriesAnalysis"; text is at most 10,000
characters per call. tests/test_safety.py runs this client against a local server with that shape.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from phi3local.errors import Phi3LocalError

API_VERSION = "2023-10-01"
ENV_ENDPOINT = "CONTENT_SAFETY_ENDPOINT"
ENV_KEY = "CONTENT_SAFETY_KEY"
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
MAX_TEXT_CHARS = 10_000


class ContentSafetyError(Phi3LocalError, RuntimeError):
    """The Content Safety service could not be reached or refused the call; the message says which."""


@dataclass(frozen=True)
class Analysis:
    severities: dict[str, int]  # category -> 0, 2, 4 or 6

    @property
    def worst(self) -> tuple[str | None, int]:
        if not self.severities:
            return None, 0
        category = max(self.severities, key=lambda c: self.severities[c])
        return category, self.severities[category]

    def blocked(self, threshold: int) -> bool:
        return self.worst[1] >= threshold


class ContentSafetyClient:
    def __init__(self, endpoint: str, key: str, timeout_s: float = 10.0):
        if not endpoint.startswith(("https://", "http://")):
            raise ContentSafetyError(f"{ENV_ENDPOINT}={endpoint!r}: expected https://<resource>.cognitiveservices.azure.com")
        self.endpoint = endpoint.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ContentSafetyClient | None:
        """A client when CONTENT_SAFETY_ENDPOINT is set (the key is then required), else None."""
        endpoint = (environ.get(ENV_ENDPOINT) or "").strip()
        if not endpoint:
            return None
        key = (environ.get(ENV_KEY) or "").strip()
        if not key:
            raise ContentSafetyError(f"{ENV_ENDPOINT} is set but {ENV_KEY} is not: set the resource's key too")
        return cls(endpoint, key)

    def analyze(self, text: str) -> Analysis:
        """Severity per category of text (its first MAX_TEXT_CHARS characters: the service's limit per call)."""
        url = f"{self.endpoint}/contentsafety/text:analyze?api-version={API_VERSION}"
        body = json.dumps({"text": text[:MAX_TEXT_CHARS] or " ", "categories": list(CATEGORIES),
                           "outputType": "FourSeverityLevels"}).encode()
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Ocp-Apim-Subscription-Key": self.key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - https endpoint
                data = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise ContentSafetyError(f"Content Safety at {self.endpoint} answered {e.code}: {_error_message(e)}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ContentSafetyError(f"Content Safety at {self.endpoint} cannot be reached: {getattr(e, 'reason', e)}"
                                     ) from None
        except ValueError:
            raise ContentSafetyError(f"Content Safety at {self.endpoint} answered something that is not JSON") from None
        try:
            return Analysis({str(item["category"]): int(item["severity"]) for item in data["categoriesAnalysis"]})
        except (KeyError, TypeError, ValueError):
            raise ContentSafetyError(f"Content Safety at {self.endpoint}: no categoriesAnalysis in its answer") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read().decode("utf-8"))["error"]
        return f"{detail.get('code')}: {detail.get('message')}"
    except Exception:  # noqa: BLE001 - whatever the body is, the status is the message
        return error.reason or "no detail"
