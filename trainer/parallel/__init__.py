"""Every collective of the trainer: the 3D topology (topology.py), the tensor-parallel communication
verbs (mappings.py), the parallel layers (layers.py), the vocab-parallel loss (cross_entropy.py) and the
model-parallel RNG with activation recomputation (random.py)."""
