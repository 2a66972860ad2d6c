"""Text -> tokenizer -> PREFIX.bin/.idx -> GLM blank-infilling samples -> batches (docs/DATA.md)."""
