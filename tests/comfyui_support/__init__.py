"""Helpers to test the pack against ComfyUI: offline (`object_info`, `workflow_api`) and live (`server`)."""
