"""Exceptions raised for bad input. Each message names the file, tensor, field or parameter at fault."""


class BitNetError(Exception):
    """Base class of every error bitnet158 raises on purpose."""


class ConfigError(BitNetError, ValueError):
    """A config.json (or ModelConfig) field is missing, of the wrong type, or unsupported."""


class CheckpointError(BitNetError, ValueError):
    """Weights missing, of the wrong shape/dtype, truncated, or in a refused format (pickle)."""


class TokenizerError(BitNetError, ValueError):
    """tokenizer.json / tokenizer_config.json / chat template missing or malformed."""


class ContextLengthError(BitNetError, ValueError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""
