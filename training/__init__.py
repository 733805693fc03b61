"""Standalone training package (accelerate) producing adapter bundles; see README. It imports ``osd_core``, never
``nodes/`` or ComfyUI, and importing it has no side effects."""
