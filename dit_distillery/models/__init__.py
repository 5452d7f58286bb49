"""Models and model files.

`aaadit` is the one model written here (no library ships it); `registry` saves and loads DiTs of every family in
our single-file format; `aaadit_presets` builds fresh AAADiTs (the CLI's `build-aaadit` and the Build AAADiT node).
What a DiT family is (configs, detection, calling, layout, components) lives in `dit_distillery.families`.
"""
