"""One error hierarchy. The CLI turns any ``SdtrtError`` into one line and exit code 2."""


class SdtrtError(Exception):
    """Base of every error sdtrt raises on purpose (bad input, failed validation, ...)."""


class UsageError(SdtrtError):
    """A command-line or API argument is invalid."""


class CheckpointError(SdtrtError):
    """A checkpoint is missing, corrupt, unsafe or of an unknown architecture."""


class ExportError(SdtrtError):
    """ONNX export or its validation failed."""


class EngineError(SdtrtError):
    """A TensorRT engine could not be built, loaded or used."""


class ShapeError(SdtrtError):
    """A requested shape is invalid or outside what an engine or graph supports."""
