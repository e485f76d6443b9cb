"""A small byte-level BPE tokenizer with Llama-3-style special tokens.

The tokenizer is trained from a corpus generated in code, so every build yields
byte-identical files without downloading anything.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT)

# 507 learned tokens + 5 specials = 512 rows, a multiple of 64 like real vocabularies.
BPE_VOCAB_SIZE = 507

# Llama 3 instruct's template, verbatim apart from whitespace.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_SUBJECTS = (
    "The old farmer",
    "A young student",
    "My neighbour",
    "The clever robot",
    "Our teacher",
    "The tired doctor",
    "A small child",
    "The river pilot",
    "Her brother",
    "The city council",
    "A quiet painter",
    "The night guard",
    "His grandmother",
    "The baker",
    "A curious fox",
    "The ship captain",
    "Every engineer",
    "The music teacher",
    "A lost traveller",
    "The librarian",
    "The gardener",
    "Each scientist",
    "The market seller",
)
_VERBS = (
    "carried",
    "painted",
    "explained",
    "repaired",
    "visited",
    "counted",
    "described",
    "discovered",
    "borrowed",
    "cleaned",
    "measured",
    "answered",
    "followed",
    "opened",
    "ordered",
    "studied",
    "watched",
    "wrote about",
    "planted",
)
_OBJECTS = (
    "the wooden table",
    "a long letter",
    "the broken bicycle",
    "three green apples",
    "the morning train",
    "an ancient map",
    "the heavy boxes",
    "a simple question",
    "the bright window",
    "two warm coats",
    "the quiet garden",
    "a new recipe",
    "the stone bridge",
    "seven blue bottles",
    "the evening news",
    "a difficult problem",
    "the paper kites",
)
_PLACES = (
    "near the harbour",
    "before breakfast",
    "in the small village",
    "after the storm",
    "during the long winter",
    "at the busy station",
    "under the old oak tree",
    "on a sunny afternoon",
    "beside the mountain lake",
    "in the crowded market",
    "at midnight",
)
_DIALOGUE = (
    "user: Hello, how are you today?",
    "assistant: I am well, thank you. How can I help you?",
    "system: You are a helpful assistant that answers briefly.",
    "user: What is the capital of France?",
    "assistant: The capital of France is Paris.",
    "user: Please write a short poem about the sea.",
    "assistant: The sea is wide, the sea is blue, it sings all night and morning too.",
    "user: Can you count from one to ten?",
    "assistant: One, two, three, four, five, six, seven, eight, nine, ten.",
    "user: Why is the sky blue?",
    "assistant: Sunlight scatters in the air, and blue light scatters the most.",
    "user\n\nTell me a story.\n\nassistant\n\nOnce upon a time there was a fox.",
    "system\n\nYou are a helpful assistant.\n\nuser\n\nHi!\n\nassistant\n\nHello!",
)
_CORPUS_SENTENCES = 400


def corpus_lines() -> Iterator[str]:
    """Yield the training corpus: templated English sentences plus a few chat turns.

    The sentences walk the word lists with coprime strides, so the corpus is varied,
    needs no random state, and is identical on every Python version.

    Returns:
        An iterator over corpus lines.
    """
    yield from _DIALOGUE
    for i in range(_CORPUS_SENTENCES):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        verb = _VERBS[(i * 7) % len(_VERBS)]
        obj = _OBJECTS[(i * 5) % len(_OBJECTS)]
        place = _PLACES[(i * 3) % len(_PLACES)]
        yield f"{subject} {verb} {obj} {place}, and {i} people saw it."
    for a, b in itertools.islice(itertools.product(range(12), repeat=2), 100):
        yield f"user: What is {a} plus {b}? assistant: {a} plus {b} is {a + b}."


@functools.cache
def _trained_json() -> str:
    # Cached as JSON text: a Tokenizer object is mutable and callers add tokens to it.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"BPE training produced {tok.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}: "
            "enlarge the generated corpus"
        )
    return tok.to_str()


def build_tokenizer(extra_tokens: Sequence[str] = ()) -> Tokenizer:
    """Build the tiny tokenizer in memory.

    Special tokens follow the learned vocabulary (as in Llama 3), and `extra_tokens`
    follow the special tokens, so a tokenizer with extras extends one without.

    Args:
        extra_tokens: Additional special tokens appended after the Llama 3 ones.

    Returns:
        A `tokenizers.Tokenizer` that prepends `<|begin_of_text|>` when encoding.
    """
    tok = Tokenizer.from_str(_trained_json())
    tok.add_special_tokens([*SPECIAL_TOKENS, *extra_tokens])
    bos_id = tok.token_to_id(BEGIN_OF_TEXT)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT}:0 $A:0",
                pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    return tok


def special_token_ids() -> dict[str, int]:
    """Return the ids of the Llama 3 special tokens (the same with or without extras).

    Returns:
        A mapping from special token text to id.
    """
    vocab = build_tokenizer().get_vocab(with_added_tokens=True)
    return {token: vocab[token] for token in SPECIAL_TOKENS}


def write_tokenizer(path: Path, *, chat: bool, extra_tokens: Sequence[str] = ()) -> int:
    """Save the tiny tokenizer as a Hugging Face tokenizer directory.

    Args:
        path: Directory to write into (created if missing).
        chat: Instruct flavour: add the chat template and end turns with `<|eot_id|>`.
            Without it the files look like a base model's: same ids, no template.
        extra_tokens: Additional special tokens appended after the Llama 3 ones.

    Returns:
        The number of tokens, i.e. the embedding rows a matching model needs.
    """
    eos = EOT if chat else END_OF_TEXT
    # transformers ships this constructor without annotations.
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=build_tokenizer(extra_tokens),
        bos_token=BEGIN_OF_TEXT,
        eos_token=eos,
        additional_special_tokens=list(extra_tokens) or None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    # transformers 5 no longer writes this file, but real Llama 3 repositories ship it
    # and older readers look for it, so the fixtures carry it too.
    special_map: dict[str, str | list[str]] = {"bos_token": BEGIN_OF_TEXT, "eos_token": eos}
    if extra_tokens:
        special_map["additional_special_tokens"] = list(extra_tokens)
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return len(fast)
