"""Tokenizers that need no download: a built-in character tokenizer, or a checkpoint's own tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from swarm.data.chat_format import BuiltinChat, chat_for
from swarm.errors import ModelSourceError

CHAR_TOKENIZER_FILE = "swarm_tokenizer.json"


class CharTokenizer:
    """One id per printable ASCII character plus newline; ids 0-3 are pad, bos, eos and unknown."""

    PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self) -> None:
        self.symbols = list(self.SPECIALS) + ["\n"] + [chr(c) for c in range(32, 127)]
        self.ids = {symbol: index for index, symbol in enumerate(self.symbols) if index >= len(self.SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = self.PAD_ID, self.BOS_ID, self.EOS_ID
        self.chat = BuiltinChat(self)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(char, self.UNK_ID) for char in text]

    def decode(self, ids) -> str:
        return "".join(self.symbols[i] for i in ids if i >= len(self.SPECIALS) and i < len(self.symbols))

    def save(self, directory: Path) -> None:
        """Our table (what load_tokenizer reads) plus the same tokenizer as Hugging Face files, for AutoTokenizer."""
        from swarm.data.char_hf_tokenizer import save_hf_tokenizer

        (Path(directory) / CHAR_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "symbols": self.symbols}))
        save_hf_tokenizer(self, directory)


class HFTokenizer:
    """A checkpoint's own Hugging Face tokenizer, read from local files only, with the chat format
    `chat_format` (data.chat_format) picks: its chat template, when it has one, unless told builtin."""

    def __init__(self, directory: Path, chat_format: str = "auto") -> None:
        from transformers import AutoTokenizer

        try:
            self.inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"{directory}: cannot load its tokenizer: {error}") from None
        self.eos_id = self.inner.eos_token_id
        if self.eos_id is None:
            raise ModelSourceError(f"{directory}: tokenizer has no end-of-sequence token")
        self.pad_id = self.inner.pad_token_id if self.inner.pad_token_id is not None else self.eos_id
        self.bos_id = self.inner.bos_token_id
        self.vocab_size = len(self.inner)
        self.chat = chat_for(self, chat_format, directory)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=True)


def check_tokenizer_fits(tokenizer, vocab_size: int, source) -> None:
    """A tokenizer with ids past the model's embedding table would index outside it at the first batch."""
    if tokenizer.vocab_size > vocab_size:
        raise ModelSourceError(f"{source}: tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}")


def load_tokenizer(directory: Path, chat_format: str = "auto"):
    """The checkpoint's tokenizer: our character tokenizer when it ships one (always the built-in chat format),
    else its Hugging Face files."""
    directory = Path(directory)
    char_file = directory / CHAR_TOKENIZER_FILE
    if char_file.is_file():
        saved = json.loads(char_file.read_text())
        tokenizer = CharTokenizer()
        if saved.get("symbols") != tokenizer.symbols:
            raise ModelSourceError(f"{char_file}: character table differs from this version's")
        tokenizer.chat = chat_for(tokenizer, chat_format, directory)
        return tokenizer
    return HFTokenizer(directory, chat_format)

