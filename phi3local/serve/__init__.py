"""Serve an exported model through the Azure ML inference server (azmlinfsrv), locally and on Azure.

    server.serve(onnx_dir, host="127.0.0.1", port=5001, workers=1, threads=4, ...)   # `phi3local serve`
    score.py     the scoring script (init / run) a deployment ships; bundle.py lists its files
    protocol.py  the chat-completions request rules and response shapes (pure Python)

Kept import-free: score.py's path must not pull in torch or transformers.
"""
