"""Standalone Hugging Face remote-code files copied verbatim into every exported folder.

They import only torch, transformers (and sentencepiece for the tokenizer), never scaleinv_dist:
see scaleinv_dist/export_hf.py and docs/generation.md.
"""
