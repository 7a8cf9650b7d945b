"""The serving runtime: an exported model through the Azure ML inference server (azmlinfsrv), locally and on
Azure, and `phi3local chat`.

    server.serve(onnx_dir, host="127.0.0.1", port=5001, workers=1, threads=4, ...)   # `phi3local serve`
    score.py     the scoring script (init / run): HTTP glue over protocol -> service -> engine
    openai_routes.py  OpenAI's paths (/v1/chat/completions, /v1/models, /info) on the server's /score view;
                 gunicorn_hooks.py adds them in each worker of `phi3local serve`
    protocol.py  the chat-completions request rules and response shapes (pure Python)
    service.py   a request through an engine: stops, streaming, the Content Safety guard, monitoring
    engine.py    the ONNX generation backend over chat.py's OnnxChatModel (onnxruntime-genai)
    batching.py  the worker's decode loop: concurrent requests advanced a token each per round on one thread
    reasoning.py a reasoning model's <think> trace split from its answer, whole or streamed (serve and chat)
    bundle.py    what a deployment ships: this package, whole, and its conda environment

Torch-free by rule: its modules import only each other and phi3local.errors (tests/test_serve.py checks
it), so the package itself is an Azure deployment's code folder, with nothing to list.
"""
