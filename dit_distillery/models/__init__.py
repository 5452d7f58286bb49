"""The DiT families we shrink, build and train.

Each family module (`qwen_image`, `aaadit`) exposes: `FAMILY` (its name), `model_class()` (a diffusers
`ModelMixin`/`ConfigMixin` class), `is_family(keys)` and `config_from_shapes(shape_of, keys)` so a stored model
is recognised and rebuilt from its tensors alone. `registry` saves and loads them in our single-file format.
"""
