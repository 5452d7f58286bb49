"""Text-to-image pipelines: `TextToImagePipeline` (every family) and loading/saving them (`loading`)."""

from .base import SampleResult, TextToImagePipeline, from_pil, to_pil

__all__ = ["SampleResult", "TextToImagePipeline", "from_pil", "to_pil"]
