"""lm-evaluation-harness on this trainer's models: the backend (backend.py) and its layouts (scoring.py), task
lookup, evaluation and results (run.py), the shipped local tasks (tasks/, their documents in local_data.py) and
the evaluation inside the training loop (in_loop.py). Needs the `eval` extra (`pip install -e '.[eval]'`)."""
