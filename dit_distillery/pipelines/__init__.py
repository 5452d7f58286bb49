"""Text-to-image pipelines: `TextToImagePipeline` (every family) and loading/saving them (`loading`)."""

from .base import FAMILY_DEFAULTS, SampleResult, TextToImagePipeline, from_pil, to_pil

__all__ = ["FAMILY_DEFAULTS", "SampleResult", "TextToImagePipeline", "from_pil", "to_pil"]
