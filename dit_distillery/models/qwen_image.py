"""Qwen-Image's configs, as tests, the benchmarks and the ComfyUI interop checks import them: the family itself
(detection, calling, layout, components) is `families/qwen_image.py`; the core imports it from there."""

from ..families.qwen_image import QWEN_IMAGE_CONFIG, QWEN_IMAGE_PARAMS, model_class, tiny_config  # noqa: F401
