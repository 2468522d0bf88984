"""The character tokenizer as a standard Hugging Face fast tokenizer, so `AutoTokenizer` and
`pipeline("text-generation")` load our presets and pretrained models like any other checkpoint.

Written next to `swarm_tokenizer.json` (which stays what the swarm itself loads): `tokenizer.json` (a
`tokenizers` serialization) and `tokenizer_config.json` (special tokens, chat template). The contract is
CharTokenizer's ids exactly: `encode(text, add_special_tokens=False)` equals `CharTokenizer.encode(text)` (one id
per character, `<unk>` for a character outside the table), `decode(ids, skip_special_tokens=True)` equals
`CharTokenizer.decode(ids)`, pad/bos/eos/unk are ids 0-3. Calling the tokenizer with special tokens (the
default, as a plain-text pipeline prompt does) puts `<bos>` first, as every sequence the swarm trains on starts;
the chat template renders one user turn as the built-in format (swarm.data.chat_format): `<bos>User:
PROMPT\\nAssistant: ` with the generation prompt, and an assistant turn as `ANSWER<eos>`.

Two deliberate details:
- Vocabulary keys are GPT-2 byte-level symbols (`Ġ` for space, `Ċ` for newline; other printable ASCII is
  itself), matched by a per-character split followed by the byte-level pre-tokenizer. transformers 5 loads every
  `qwen2` checkpoint with its own Qwen2Tokenizer, which keeps only the vocabulary and rebuilds a byte-level
  pipeline around it; with byte-level keys that reconstruction is still exact on CharTokenizer's characters (it
  drops a character outside the table instead of giving `<unk>`). Every other family loads this file as is.
- `tokenizer_class` is `PreTrainedTokenizerFast`, the name both transformers 4.x and 5.x resolve (5.x saves its
  own alias `TokenizersBackend`, unknown to 4.x).

As everywhere in transformers, the text `<bos>` (or another special token) inside the input is read as that
special token, where CharTokenizer spells it out character by character; `apply_chat_template(...,
sanitize_control_tokens=True)` keeps it text in messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.data.tokenizer import CharTokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Files save_hf_tokenizer writes into a checkpoint directory.
HF_TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE)
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# The built-in chat format (swarm.data.chat_format.BUILTIN_PROMPT) as Jinja; a test checks they agree.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'User: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('this model knows only user and assistant turns, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def hf_tokenizer(char: CharTokenizer):
    """A `PreTrainedTokenizerFast` that gives `char`'s ids (see the module docstring for the contract)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials = set(char.SPECIALS)

    def key(symbol: str) -> str:
        return symbol if symbol in specials else byte_level.pre_tokenize_str(symbol)[0][0]

    vocab = {key(symbol): index for index, symbol in enumerate(char.symbols)}
    assert len(vocab) == len(char.symbols), "two characters share a byte-level symbol"
    pad, bos, eos, unk = (char.SPECIALS[i] for i in (char.PAD_ID, char.BOS_ID, char.EOS_ID, char.UNK_ID))
    inner = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    # One pre-token per character, so WordLevel maps each character (a multi-byte one as a whole) to one id.
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), byte_level])
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in char.SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)


def save_hf_tokenizer(char: CharTokenizer, directory: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (chat template inside it) for `char` into `directory`."""
    directory = Path(directory)
    # save_jinja_files=False keeps the template in tokenizer_config.json, where every transformers version reads it.
    hf_tokenizer(char).save_pretrained(directory, save_jinja_files=False)
    config_file = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    # save_pretrained drops add_bos_token; stated, it makes transformers 5 rebuild the same bos post-processor.
    config.update(tokenizer_class=PORTABLE_TOKENIZER_CLASS, add_bos_token=True, add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
