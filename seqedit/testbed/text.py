"""The testbed's text side: a byte-level BPE tokenizer trained on its corpus, and the
corpus packed into training rows (with ROME-style context fragments).

Every random choice comes from a private, seeded `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS: Final = "<|endoftext|>"
_TARGET_REPEATS: Final = 4  # copies of each target in the tokenizer training text


def train_tokenizer(
    statements: Sequence[str],
    vocab_size: int,
    n_positions: int,
    targets: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on `statements`; `<|endoftext|>` is id 0 and
    serves as bos, eos, pad and unk.

    `targets` (objects, scored with a leading space) are added to the tokenizer's training
    text a few times each, so every object gets a compact tokenisation even when it is
    rare among the true facts: a new target should be a word of the model's vocabulary, not
    a string of single bytes it has never produced. The model itself never trains on them.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    target_text = [" " + t.strip() for t in targets for _ in range(_TARGET_REPEATS)]
    tok.train_from_iterator([*statements, *target_text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=n_positions,
    )


class PackedRows:
    """Batches of rows packing whole shuffled statements: s1 <eos> s2 <eos> ... <pad>.

    With probability `context_prob` a statement is preceded by a context fragment, the
    first tokens of another statement and a ".", as in ROME's context templates
    ("The mother tongue of. {}"): facts must hold after such text too, not only at the
    start of a sequence. Fragments condition the statement but are not predicted
    (label -100); padding is masked. Statements longer than a row are truncated. With
    `english` sentences, each item is one of them with probability `english_share`, taken
    in a shuffled order of its own, so the model learns the language as well as the facts.
    Every random choice comes from the private, seeded `generator`.
    """

    def __init__(
        self,
        bare: list[list[int]],
        spaced: list[list[int]],
        *,
        seq_len: int,
        eos_id: int,
        dot_id: int,
        context_prob: float,
        generator: torch.Generator,
        english: Sequence[list[int]] = (),
        english_share: float = 0.0,
    ) -> None:
        self._bare, self._spaced = bare, spaced
        self._english, self._english_share = list(english), english_share
        self._english_queue: list[int] = []
        self._seq_len, self._eos, self._dot = seq_len, eos_id, dot_id
        self._context_prob = context_prob
        self._gen = generator
        self._queue: list[int] = []

    def state(self) -> dict[str, Any]:
        """Where the stream stands: the generator's state and both queues (for a resumable
        build; `restore` continues the stream exactly)."""
        return {
            "generator": self._gen.get_state(),
            "queue": list(self._queue),
            "english_queue": list(self._english_queue),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the stream from a `state()`."""
        self._gen.set_state(state["generator"])
        self._queue = list(state["queue"])
        self._english_queue = list(state["english_queue"])

    @property
    def n_tokens(self) -> int:
        """Tokens in the statements, each counted once (no fragments, no separators)."""
        return sum(map(len, self._bare))

    def _rand(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self._gen))

    def _item(self, index: int) -> tuple[list[int], list[int]]:
        """(tokens, labels) of one statement, maybe after a fragment, without separator."""
        if self._context_prob <= 0 or float(torch.rand(1, generator=self._gen)) >= (
            self._context_prob
        ):
            return self._bare[index], self._bare[index]
        other = self._bare[self._rand(len(self._bare))]
        fragment = [*other[: 1 + self._rand(max(1, len(other) - 1))], self._dot]
        statement = self._spaced[index]
        return fragment + statement, [-100] * len(fragment) + statement

    def _next(self) -> tuple[list[int], list[int], list[int]]:
        """(tokens, labels, queue it came from) of the next item; not yet taken."""
        if self._english and float(torch.rand(1, generator=self._gen)) < self._english_share:
            if not self._english_queue:
                order = torch.randperm(len(self._english), generator=self._gen)
                self._english_queue = order.tolist()
            sentence = self._english[self._english_queue[-1]]
            return sentence, sentence, self._english_queue
        if not self._queue:
            self._queue = torch.randperm(len(self._bare), generator=self._gen).tolist()
        return (*self._item(self._queue[-1]), self._queue)

    def _row(self) -> tuple[list[int], list[int]]:
        tokens: list[int] = []
        labels: list[int] = []
        while True:
            item, item_labels, queue = self._next()
            if tokens:
                item, item_labels = [self._eos, *item], [self._eos, *item_labels]
                if len(tokens) + len(item) > self._seq_len:
                    return tokens, labels
            queue.pop()
            tokens += item
            labels += item_labels
            if len(tokens) >= self._seq_len:
                return tokens[: self._seq_len], labels[: self._seq_len]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, labels, attention_mask), each (size, seq_len) int64."""
        inputs = torch.full((size, self._seq_len), self._eos, dtype=torch.long)
        labels = torch.full((size, self._seq_len), -100, dtype=torch.long)
        mask = torch.zeros((size, self._seq_len), dtype=torch.long)
        for i in range(size):
            tokens, row_labels = self._row()
            inputs[i, : len(tokens)] = torch.tensor(tokens)
            labels[i, : len(tokens)] = torch.tensor(row_labels)
            mask[i, : len(tokens)] = 1
        return inputs, labels, mask
