"""glm-launch: turn "these devices" into "this 3D topology" and start the ranks with DeepSpeed's launcher.

devices.py finds the hosts and device memory, memory.py estimates bytes per GPU for a layout,
planner.py chooses (tp, pp, dp, micro-batch, accumulation, activation recomputation), cli.py is the command.
"""
