"""Export stages: merge a LoRA adapter, build an onnxruntime-genai model, check parity, chat with it.

    merge.merge_adapter(run_or_adapter, out_dir, dtype="float32", verify_tolerance=None, overwrite=False)
    onnx.export_onnx(model_dir, out_dir, precision="int4", target="cpu", adapter_path=None, ...)
    parity.check_parity(onnx_dir, hf_model_dir, prompts, new_tokens=64, ...)
    chat.chat(model_dir, prompt=None, system=None, ...), chat.generate_onnx(model_dir, messages, ...)

The submodules are imported on use (torch, transformers and onnxruntime-genai are heavy imports).
"""
