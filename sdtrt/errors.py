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


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for an error message; a first line ending in ':' (torch's
    state-dict errors) gets the next one too."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(e).__name__}: {text}"


class LoraError(UsageError):
    """A LoRA file is missing, corrupt, out of range or made for another model."""
