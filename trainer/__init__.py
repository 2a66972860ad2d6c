"""The GLM trainer (docs/ARCHITECTURE.md).

One thing runs before anything else of the package: DeepSpeed, on its first import on a machine whose accelerator
it does not find, logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
it." on every command and every rank (even `--help`). The trainer names the device it runs on itself, so that one
message is dropped here; every other DeepSpeed message stays. It must be installed before DeepSpeed's first
import, which is why it is not in trainer/engine/deepspeed_compat.py (the adapter that holds every other use of a
DeepSpeed name that is not public API: its logger's name, "DeepSpeed", is one).
"""
import logging


class _DropCpuFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


logging.getLogger("DeepSpeed").addFilter(_DropCpuFallbackNotice())
