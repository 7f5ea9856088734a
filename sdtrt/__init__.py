"""sdtrt: the fastest dependable way to run Stable Diffusion on NVIDIA servers.

Stages: ``sdtrt.checkpoint`` (load), ``sdtrt.export`` (checkpoint -> ONNX), ``sdtrt.engines`` (ONNX -> TensorRT),
``sdtrt.runtime`` (schedulers, pipeline, backends).
"""

__version__ = "0.1.0"
