"""Data configuration: where the text is and how blank-infilling samples are made (GLM-SPEC section 1)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainer.errors import ConfigError

BLANK_MODES = ("mask", "smask", "gmask")
"""The modes that cut blanks out of the text (trainer/data/blank_infilling.py; glm-prep --samples shows these)."""
MODES = BLANK_MODES + ("causal",)
"""Every sample mode data.modes may weight: the blank-infilling ones and GLM-4's causal (Part A empty)."""
MAX_SEQ_LENGTH = 2 ** 21
"""The longest row accepted: 16 times GLM-4's 128K context; longer is a typo that would allocate rows for minutes."""
MAX_POISSON_LAMBDA = 1000.0
"""Above this the span lengths are all at their cap; a larger lambda is a typo, not a setting."""


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


ENTRY_KEYS = ("path", "weight", "modes", "seq_length")
"""The keys of a data.datasets entry (path and weight required)."""


@dataclass
class DataConfig:
    path: str = ""
    """Prefix of a prepared dataset (PREFIX.bin + PREFIX.idx from glm-prep). Empty: the embedded
    pydoc corpus, built on first use into the cache directory."""
    tokenizer: str = ""
    """Path of a tokenizer.json. Empty: the tokenizer next to `path` (PREFIX.tokenizer.json), or the
    embedded default's."""
    seq_length: int = 128
    """Slots of a training sequence (row): one sample, or several packed ones (data.packing), then padding."""
    packing: bool = True
    """Pack several whole samples into each row, each attending only to itself (docs/DATA.md); false: one
    sample per row, padded."""
    packing_window: int = 1000
    """Consecutive samples the packer fits into rows together (best-fit decreasing within each window); a
    larger window wastes less at the cost of a longer scan to find a row."""
    mask_ratio: float = 0.15
    """[MASK] and [sMASK]: at least this fraction of the text's tokens is masked."""
    poisson_lambda: float = 3.0
    """[MASK] span lengths ~ Poisson(lambda), truncated to 1..39."""
    gmask_ratio_min: float = 0.5
    """[gMASK]: the suffix length is uniform in [min, max] * n (GLM 0.5-1.0; GLM-130B 0.2-1.0)."""
    gmask_ratio_max: float = 1.0
    """Upper end of the [gMASK] suffix ratio range."""
    modes: dict = field(default_factory=lambda: {"mask": 1.0})
    """Mixture of modes: weights for the blank-infilling `mask`, `smask`, `gmask`, and `causal` (GLM-4's
    objective: the whole text after [gMASK] <sop>, left to right), normalised. GLM-10B: {mask: 0.5, smask: 0.3,
    gmask: 0.2}; GLM-130B: {mask: 0.3, gmask: 0.7}; GLM-4: {causal: 1.0}."""
    valid_fraction: float = 0.0
    """Fraction of the sequences held out for validation (0 = no validation split)."""
    datasets: list = field(default_factory=list)
    """Datasets mixed by weight, each {path: PREFIX, weight: w} (path "" = the embedded corpus); a prefix from
    `glm-prep --instructions` gives instruction samples, any other blank-infilling samples (data.modes). An
    entry may set its own `modes` and `seq_length` (the longest sample it makes, <= data.seq_length): GLM-130B's
    mixture packs 512-token [MASK] samples four to a 2048 row beside [gMASK] samples as long as the row. One
    tokenizer for all (data.tokenizer, else the first prefix's). Non-empty: data.path must be empty."""
    mixture_unit: str = "samples"
    """What the data.datasets weights share: `samples`, or `tokens` (corpus tokens per sample; GLM-130B put
    instruction data on 5% of tokens)."""
    instruction_truncation: str = "left"
    """Instruction records longer than seq_length: cut the prompt from the `left` (keep its end), from the
    `right` (keep its start), or `error`. The response is never cut."""
    instruction_format: str = "glm"
    """How an instruction record becomes a sample: `glm` (Part A = [CLS] + prompt + [gMASK], the response
    generated as Part B) or `chat`, GLM-4's causal chat layout [gMASK] <sop> <|user|> \\n prompt <|assistant|>
    \\n response, the loss on the response and the <|endoftext|> after it (needs a GLM-4-style tokenizer)."""

    def validate(self) -> None:
        if self.seq_length < 8:
            raise ConfigError(f"data.seq_length={self.seq_length} is too short for one blank and its "
                              f"sop/eop tokens: use at least 8")
        if self.seq_length > MAX_SEQ_LENGTH:
            raise ConfigError(f"data.seq_length={self.seq_length} is above {MAX_SEQ_LENGTH} tokens, longer than any "
                              f"GLM's context: use the model's context length (GLM-130B 2048, GLM-4 up to 131072)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"data.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not (math.isfinite(self.poisson_lambda) and 0 < self.poisson_lambda <= MAX_POISSON_LAMBDA):
            raise ConfigError(f"data.poisson_lambda must be a finite number in (0, {MAX_POISSON_LAMBDA}] (spans are "
                              f"cut to 1..39 tokens; GLM uses 3), got {self.poisson_lambda}")
        if not 0.0 < self.gmask_ratio_min <= self.gmask_ratio_max <= 1.0:
            raise ConfigError(f"data.gmask_ratio_min/max must satisfy 0 < min <= max <= 1, got "
                              f"{self.gmask_ratio_min}, {self.gmask_ratio_max}")
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ConfigError(f"data.modes has unknown mode(s) {sorted(unknown)}: use {', '.join(MODES)}")
        if not all(is_finite_number(w) and w >= 0 for w in self.modes.values()) or sum(self.modes.values()) <= 0:
            raise ConfigError(f"data.modes weights must be finite numbers >= 0 with a positive sum, got {self.modes}")
        if self.packing_window < 1:
            raise ConfigError(f"data.packing_window must be >= 1 sample, got {self.packing_window}")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ConfigError(f"data.valid_fraction must be in [0, 0.5), got {self.valid_fraction}")
        self._validate_mixture()

    def _validate_mixture(self) -> None:
        if self.mixture_unit not in ("samples", "tokens"):
            raise ConfigError(f"data.mixture_unit={self.mixture_unit!r}: use samples or tokens")
        if self.instruction_truncation not in ("left", "right", "error"):
            raise ConfigError(f"data.instruction_truncation={self.instruction_truncation!r}: use left, right or error")
        if self.instruction_format not in ("glm", "chat"):
            raise ConfigError(f"data.instruction_format={self.instruction_format!r}: use glm or chat")
        if self.datasets and self.path:
            raise ConfigError("data.path and data.datasets are both set: list every dataset (this one included) "
                              "in data.datasets and leave data.path empty")
        for i, entry in enumerate(self.datasets):
            if (not isinstance(entry, dict) or not {"path", "weight"} <= set(entry) <= set(ENTRY_KEYS)
                    or not isinstance(entry["path"], str)
                    or not is_finite_number(entry["weight"]) or entry["weight"] <= 0):
                raise ConfigError(f"data.datasets[{i}] = {entry!r}: each entry must be {{path: PREFIX, weight: w}} "
                                  f"with w > 0, optionally with modes: {{mask: w, ...}} and seq_length: n")
            self._validate_entry(i, entry)

    def _validate_entry(self, i: int, entry: dict) -> None:
        """An entry's own modes and seq_length, checked as the component dataset will use them."""
        length = entry.get("seq_length", self.seq_length)
        if isinstance(length, bool) or not isinstance(length, int) or not 8 <= length <= self.seq_length:
            raise ConfigError(f"data.datasets[{i}].seq_length={length!r}: use an integer in [8, data.seq_length="
                              f"{self.seq_length}] (the longest sample this dataset makes)")
        modes = entry.get("modes", self.modes)
        if not isinstance(modes, dict):
            raise ConfigError(f"data.datasets[{i}].modes={modes!r}: use a mapping like {{mask: 0.3, gmask: 0.7}}")
        try:
            DataConfig(seq_length=length, modes=modes, mask_ratio=self.mask_ratio).validate()
        except ConfigError as error:
            raise ConfigError(f"data.datasets[{i}]: {error}") from None
