"""Errors the runtime raises. Each message says what went wrong and what to do about it."""


class CoromError(Exception):
    """Base class of every corom-onnx error."""


class InvalidInputError(CoromError, ValueError):
    """A caller's texts or options are invalid (HTTP 400). Still a `ValueError` for `encode` callers."""


class InvalidInputTypeError(CoromError, TypeError):
    """A caller passed the wrong type (HTTP 400). Still a `TypeError` for `encode` callers."""


def positive_int(value: object, what: str) -> int:
    """`value` when it is a whole number of at least 1 (a bool is not one), else `InvalidInputError`
    naming `what`: the one check behind every count a caller or a setting gives.

    >>> positive_int(3, "batch_size")
    3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{what} must be a whole number of at least 1, got {value!r}")
    return value


class RequestTooLargeError(InvalidInputError):
    """A request larger than a limit it can never fit in (HTTP 413); retrying cannot help."""


class TextTooLongError(RequestTooLargeError):
    """Texts longer than the model's window where the caller said not to truncate (HTTP 413)."""


class PresetError(CoromError, KeyError):
    """An unknown or malformed model preset."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ArtifactError(CoromError):
    """An artifact folder that is missing, corrupt or does not match its manifest."""


class MissingArtifactError(ArtifactError):
    """A preset whose artifact has not been exported on this machine yet."""

    def __init__(self, message: str, preset: str) -> None:
        super().__init__(message)
        self.preset = preset


class VariantRejectedError(ArtifactError):
    """A variant that fails its parity gate on this CPU or engine version (it passed elsewhere)."""


class ProviderUnavailableError(CoromError):
    """An execution provider was asked for but this onnxruntime build or machine lacks it."""


class OverloadedError(CoromError):
    """The dynamic batcher's queue is full: back off and retry."""


class BatcherClosedError(CoromError):
    """The dynamic batcher was closed and accepts no new requests."""
