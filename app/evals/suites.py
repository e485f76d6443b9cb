"""The suites, on lm-evaluation-harness: its task runner (``simple_evaluate`` with a
``TaskManager`` over the task YAMLs shipped in ``app/evals/tasks`` or the user's own),
its OpenAI-compatible chat client for generation, its ``hf`` model for log-likelihoods,
its IFEval checkers. Runs in the evaluation child process (see :mod:`app.evals.worker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidParameterError, RealignError
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, SuiteName, SuiteScore

TASKS = Path(__file__).resolve().parent / "tasks"
DATA = Path(__file__).resolve().parent / "data"
GENERAL_TEXT = DATA / "general.txt"
Emit = Callable[[EvalProgress], None]


class SuiteError(RealignError, RuntimeError):
    """A suite could not run; the message says which and why."""

    code = "eval_suite_failed"


@dataclass(frozen=True)
class Run:
    """One model's evaluation: where to send requests, what to run, where progress goes."""

    target: EvalTarget
    spec: EvalSpec
    emit: Emit


def _quiet() -> None:
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _evaluate(lm: Any, tasks: list[str], manager: Any, run: Run, chat: bool) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    _quiet()
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=run.spec.limit,
        apply_chat_template=chat,
        gen_kwargs={"max_gen_toks": run.spec.max_tokens} if chat else None,
        log_samples=False,
        bootstrap_iters=0,
    )
    if out is None:
        raise SuiteError(f"lm-eval returned no results for {', '.join(tasks)}")
    return dict(out)


def _chat_model(run: Run, suite: str, total: int) -> Any:
    from app.evals.client import RealignChat

    if run.target.base_url is None:
        raise SuiteError(f"{suite}: no endpoint to send chat requests to")
    return RealignChat(
        run.target.base_url,
        run.target.model,
        api_key=run.target.api_key,
        concurrency=run.spec.concurrency,
        max_tokens=run.spec.max_tokens,
        on_reply=lambda n: run.emit(EvalProgress(suite=suite, done=n, total=total)),
    )


def _hf_model(run: Run, suite: str, **options: Any) -> Any:
    import torch
    from lm_eval.models.huggingface import HFLM

    weights = run.target.weights
    if weights is None:
        raise InvalidParameterError(
            f"{suite}: log-likelihoods need the model's weights directory; give it "
            "(--model-dir, `model_dir`) along with the served model"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pretrained: Any = weights
    if run.target.inline_residual:
        pretrained = _merged_in_memory(run.target, weights, device)
    return HFLM(pretrained=pretrained, device=device, batch_size=run.spec.concurrency, **options)


def _merged_in_memory(target: EvalTarget, weights: str, device: str) -> Any:
    """The model ``weights + alpha x R`` built in memory from the streamed merge (the
    values a written merge holds), without writing a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.residuals.inline import stream_merged

    assert target.inline_residual is not None
    model = AutoModelForCausalLM.from_pretrained(weights, dtype="auto")
    params = model.state_dict()
    merged = stream_merged(Path(target.inline_residual), Path(weights), target.inline_alpha)
    with torch.no_grad():
        for name, tensor in merged:
            if name in params:
                params[name].copy_(tensor)
    return model.to(device).eval()  # type: ignore[arg-type]


def _metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    """``{metric: value}`` of one task's results (lm-eval keys them ``metric,filter``)."""
    out: dict[str, float] = {}
    for key, value in results["results"][task].items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return out


def _count(results: dict[str, Any], task: str) -> int:
    return int(results.get("n-samples", {}).get(task, {}).get("effective", 0))


def _docs(name: str, limit: int | None) -> int:
    lines = [x for x in (DATA / name).read_text().splitlines() if x.strip()]
    return min(len(lines), limit or len(lines))


def _generation(
    run: Run, suite: SuiteName, task: str, data: str, names: dict[str, str]
) -> SuiteScore:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    total = _docs(data, run.spec.limit)
    run.emit(EvalProgress(suite=suite, total=total, message="generating"))
    started = time.perf_counter()
    lm = _chat_model(run, suite, total)
    results = _evaluate(lm, [task], manager, run, chat=True)
    metrics = {names.get(k, k): v for k, v in _metrics(results, task).items()}
    return SuiteScore(
        suite=suite,
        metrics=metrics,
        higher_is_better=dict.fromkeys(metrics, True),
        n=_count(results, task),
        seconds=time.perf_counter() - started,
        requests_per_s=lm.requests_per_s,
    )


def format_suite(run: Run) -> SuiteScore:
    """Fraction of replies that end on a stop token within the budget and open as the
    assistant's reply (``format``), and each part alone (``stop_rate``, ``open_rate``)."""
    return _generation(run, SuiteName.chat_format, "realign_format", "format_prompts.jsonl", {})


def ifeval_suite(run: Run) -> SuiteScore:
    """IFEval's strict (and loose) accuracy, per prompt and per instruction."""
    names = {
        "prompt_level_strict_acc": "prompt_strict",
        "inst_level_strict_acc": "instruction_strict",
        "prompt_level_loose_acc": "prompt_loose",
        "inst_level_loose_acc": "instruction_loose",
    }
    return _generation(
        run, SuiteName.ifeval_lite, "realign_ifeval_lite", "ifeval_lite.jsonl", names
    )


def perplexity_suite(run: Run) -> SuiteScore:
    """Token perplexity of the shipped general text (``ppl_general``) and of each user
    text (``ppl_<name>``), with lm-eval's ``hf`` model on the weights directory."""
    from lm_eval.tasks import TaskManager

    texts = {"general": str(GENERAL_TEXT), **run.spec.texts}
    # Documents are scored after the prefix token (BOS) alone: lm-eval's hf model would
    # otherwise also encode them with the tokenizer's own BOS, scoring a BOS after BOS.
    lm = _hf_model(run, SuiteName.perplexity, add_bos_token=False)
    metrics: dict[str, float] = {}
    n, started = 0, time.perf_counter()
    for done, (name, path) in enumerate(texts.items()):
        run.emit(
            EvalProgress(suite=SuiteName.perplexity, done=done, total=len(texts), message=name)
        )
        meta = {"text_file": str(Path(path).resolve()), "tokenizer": run.target.weights}
        manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=meta)
        results = _evaluate(lm, ["realign_perplexity"], manager, run, chat=False)
        metrics[f"ppl_{name}"] = _metrics(results, "realign_perplexity")["token_perplexity"]
        n += _count(results, "realign_perplexity")
    run.emit(EvalProgress(suite=SuiteName.perplexity, done=len(texts), total=len(texts)))
    return SuiteScore(
        suite=SuiteName.perplexity,
        metrics=metrics,
        higher_is_better=dict.fromkeys(metrics, False),
        n=n,
        seconds=time.perf_counter() - started,
    )


def custom_suite(run: Run) -> SuiteScore:
    """The user's lm-eval tasks (``tasks_dir``, ``tasks``): generation tasks through the
    chat endpoint, log-likelihood tasks with the ``hf`` model on the weights."""
    from lm_eval.tasks import TaskManager

    spec = run.spec
    if not spec.tasks_dir or not spec.tasks:
        raise InvalidParameterError("custom: give a task directory and at least one task name")
    manager = TaskManager(include_path=spec.tasks_dir, include_defaults=False)
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidParameterError(
            f"custom: no task {', '.join(map(repr, unknown))} in {spec.tasks_dir}; it has: "
            f"{', '.join(manager.all_tasks) or 'no task YAML'}"
        )
    loaded = manager.load(list(spec.tasks))["tasks"].values()
    chat = all(t.OUTPUT_TYPE == "generate_until" for t in loaded)
    started = time.perf_counter()
    lm = _chat_model(run, SuiteName.custom, 0) if chat else _hf_model(run, SuiteName.custom)
    results = _evaluate(lm, list(spec.tasks), manager, run, chat=chat)
    seconds = time.perf_counter() - started
    metrics: dict[str, float] = {}
    better: dict[str, bool] = {}
    for task in results["results"]:
        hib = results.get("higher_is_better", {}).get(task, {})
        for metric, value in _metrics(results, task).items():
            metrics[f"{task}/{metric}"] = value
            better[f"{task}/{metric}"] = bool(hib.get(metric.split("/")[0], True))
    n = sum(_count(results, t) for t in results.get("n-samples", {}))
    rate = lm.requests_per_s if chat else None
    return SuiteScore(
        suite=SuiteName.custom,
        metrics=metrics,
        higher_is_better=better,
        n=n,
        seconds=seconds,
        requests_per_s=rate,
    )


SUITES: dict[SuiteName, Callable[[Run], SuiteScore]] = {
    SuiteName.chat_format: format_suite,
    SuiteName.ifeval_lite: ifeval_suite,
    SuiteName.perplexity: perplexity_suite,
    SuiteName.custom: custom_suite,
}
