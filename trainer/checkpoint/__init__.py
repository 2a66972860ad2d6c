"""Checkpoints between layouts and tools: tensor-parallel split rules, DeepSpeed pipeline checkpoints read
and written at any (tp, pp), resume at another layout with the optimizer state, single-file export, and
import of THUDM/GLM release checkpoints. Everything passes through one canonical, layout-free state dict:
GLMModel's parameter names, full (unsharded) tensors, fused parts in logical order, vocabulary unpadded."""
