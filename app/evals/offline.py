"""Evaluation runs offline: nothing waits on a download.

The suites read only data shipped with Realign or given by the user. Three libraries
would still reach for the network: ``huggingface_hub``/``datasets``/``transformers``
(Hub look-ups, e.g. lm-eval's model-info call), and nltk, which lm-eval's IFEval
checkers ask at import to download ``punkt_tab`` — a plain ``urlopen`` without a
timeout, which waits as long as the network lets it. The evaluation runs in a child
process whose environment turns the Hub libraries offline before they are imported
(:func:`offline_env`), and the IFEval checkers are imported with the download skipped
(:func:`ifeval_checkers`).

Only the checkers that need no nltk data are used: of the 25, ``punkt_tab`` is needed by
``length_constraints:number_sentences`` and ``change_case:capital_word_frequency``
(both raise ``LookupError`` without it); the other 23 work offline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType

# Checkers whose check_following needs nltk's punkt_tab data.
NEEDS_NLTK_DATA = frozenset(
    {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an evaluation child process: ``base`` (this process's when
    None) with the Hub libraries switched offline."""
    return {**(os.environ if base is None else base), **OFFLINE_ENV}


def ifeval_checkers() -> ModuleType:
    """``lm_eval.tasks.ifeval.instructions_registry``, imported without nltk's download.

    lm-eval's ``instructions_util`` calls ``nltk.download("punkt_tab")`` at import when
    the data is missing, but only on the process of rank 0 (``LOCAL_RANK`` unset or
    ``"0"``, read once at import): the import runs as another rank, and the variable is
    put back at once. Where ``punkt_tab`` is installed nothing changes.

    Returns:
        The registry module (``INSTRUCTION_DICT``: instruction id -> checker class).
    """
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "1"
    try:
        from lm_eval.tasks.ifeval import instructions_registry as registry
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved
    module: ModuleType = registry
    return module
