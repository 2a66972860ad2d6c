"""Every collective of the trainer: the layout of named axes and its rank order (mesh.py), the process
topology (topology.py), the loop's collectives (comm.py), the tensor-parallel communication verbs
(mappings.py), the parallel layers (layers.py), the vocab-parallel loss (cross_entropy.py) and the
model-parallel RNG with activation recomputation (random.py)."""
