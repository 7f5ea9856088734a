"""LoRA files -> per-module weight deltas, applied by each backend at run time (no re-export, no rebuild).

``files``: reading kohya/A1111 and diffusers/PEFT ``.safetensors`` files into low-rank layers. ``targets``: which
modules a LoRA may change and, at export, the ONNX initializer holding each one's weight (the manifest's map).
``deltas``: a request's LoRA set, checked against the model, summed into one float32 delta per module.
"""
