"""The tools on top of the layers: what a command runs (glm-generate, glm-eval, glm-ckpt), what is checked before
any process group starts (preflight), the model source every offline tool takes, decoding, the end-of-run demo and
the lm-evaluation-harness backend. They import any layer below them; nothing below imports them."""
