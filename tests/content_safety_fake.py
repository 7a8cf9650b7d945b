"""Azure AI Content Safety's text:analyze on 127.0.0.1, for tests/test_safety.py and tests/test_serve.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeContentSafety:
    """Content Safety's text:analyze on 127.0.0.1: Violence 6 for text containing `harmful`, else all 0.

    status: what every call answers (not 200: an error body); down_after: once that many calls were
    answered, every further call gets a 503 (an outage mid-stream). Both may be changed between requests.
    """

    def __init__(self, status: int = 200, harmful: str = "HARM", down_after: int | None = None):
        self.calls = []
        self.status, self.harmful, self.down_after = status, harmful, down_after
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append((self.path, self.headers.get("Ocp-Apim-Subscription-Key"), body))
                status = fake.status
                if fake.down_after is not None and len(fake.calls) > fake.down_after:
                    status = 503
                if status != 200:
                    payload = {"error": {"code": "InvalidRequestBody", "message": "The text is empty."}}
                else:
                    severity = 6 if fake.harmful in body["text"] else 0
                    payload = {"blocklistsMatch": [], "categoriesAnalysis": [
                        {"category": c, "severity": severity if c == "Violence" else 0} for c in body["categories"]]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
