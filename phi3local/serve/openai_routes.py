"""OpenAI's routes on `phi3local serve`: the paths the `openai` and `azure-ai-inference` clients call.

    POST /v1/chat/completions, POST /chat/completions   the chat request of POST /score (streaming too)
    GET  /v1/models, GET /models                          the served model, as OpenAI's model list
    GET  /info, GET /v1/info                              the model information azure-ai-inference reads

The `openai` client appends `chat/completions` and `models` to its base URL (http://127.0.0.1:5001/v1);
azure-ai-inference's ChatCompletionsClient posts `{endpoint}/chat/completions?api-version=...` and reads
`{endpoint}/info` (endpoint http://127.0.0.1:5001). Both bases work for both clients.

azmlinfsrv serves only `/`, `/score` and `/swagger.json`, and has no extension point for more routes. Its
app is a plain Flask app, though, and Flask's public `add_url_rule` adds a path to an existing endpoint:
add_routes() gives each path above to the app's `/score` endpoint, the server's own scoring view. A request
to any of them therefore runs exactly as a POST /score does: azmlinfsrv's request-id headers, CORS, access
log and App Insights hooks, then score.run(request), whose respond() answers by the path (route_of). No file
of azmlinfsrv is copied or patched.

The routes are added in each worker after it loaded the app (and score.init() ran) and before it serves:
gunicorn's post_worker_init hook (phi3local.serve.gunicorn_hooks), which `phi3local serve` passes through
GUNICORN_CMD_ARGS (phi3local.serve.server.server_environment). An Azure deployment does not get them: it
runs azmlinfsrv from the image with the deployment's own environment (no hook), so its container serves `/`,
`/score` and `/swagger.json`, and clients call the endpoint's scoring URI (docs/serving.md, "On Azure").
"""

from __future__ import annotations

SCORE_PATH = "/score"
CHAT = "chat"
MODELS = "models"
INFO = "info"
ROUTES = {
    "/v1/chat/completions": CHAT, "/chat/completions": CHAT,
    "/v1/models": MODELS, "/models": MODELS,
    "/info": INFO, "/v1/info": INFO,
}
# As azmlinfsrv registers /score: every method reaches run(), which answers the ones a path does not take
# with an OpenAI-style 405 and a CORS preflight (OPTIONS) with 200.
METHODS = ["GET", "POST", "OPTIONS"]


def route_of(path: str) -> str:
    """What a request path asks for: CHAT for /score and the chat paths (and any path not listed), MODELS, INFO."""
    return ROUTES.get(path.rstrip("/") or "/", CHAT)


def add_routes(app) -> list[str]:
    """Give every path of ROUTES to the Flask app's /score endpoint (before the app serves); returns the paths."""
    endpoint = next((rule.endpoint for rule in app.url_map.iter_rules() if rule.rule == SCORE_PATH), None)
    if endpoint is None:
        raise LookupError(f"the server's app has no {SCORE_PATH} route to add OpenAI's routes to")
    view = app.view_functions[endpoint]
    for path in ROUTES:
        # The same endpoint name keeps the request in azmlinfsrv's blueprint: its before/after-request hooks
        # and error handlers apply as they do to /score.
        app.add_url_rule(path, endpoint=endpoint, view_func=view, methods=METHODS, provide_automatic_options=False)
    return list(ROUTES)


def add_routes_to_worker(worker) -> None:
    """gunicorn's post_worker_init: the worker's app gets the routes, or the log says why it serves /score only
    (worker.log: gunicorn's error log, which azmlinfsrv's logging config prints)."""
    try:
        paths = add_routes(worker.wsgi)
    except Exception as e:  # the server still serves /score: say so once per worker, without a traceback
        worker.log.error("OpenAI routes (/v1/chat/completions, /v1/models) are not served: %s: %s (POST /score "
                         "still is)", type(e).__name__, e)
        return
    worker.log.info("worker %s also serves %s", worker.pid, ", ".join(paths))
