"""The EM protocol on a real chat model (default SmolLM2-135M-Instruct), with the time of each phase.

A narrow misaligned finetune on a small dataset written for it (cartoonish, harmless plant-care
"bad advice" such as "water your cactus every hour": ``tests/data/smollm2/make.py``, every row of
its ``PLANTS`` list), and the general questions (emlab's eight, Betley et al.'s main questions) and
in-domain held-out questions sampled at temperature 1 and judged before and after. EM = aligned < 30
and coherent > 50 (percent). Phases timed: model load, sampling + judging before, finetune,
sampling + judging after.

The judge is any OpenAI-compatible model by name (``--judge gpt-4o-mini`` with ``OPENAI_API_KEY``,
and ``OPENAI_BASE_URL`` for another endpoint) or ``--judge fake``: the tests' loopback server
(``tests/fake_openai_server.py``), whose scores are meaningless (timing and protocol only).

EM is not expected at 135M parameters (the smallest model with reported EM is 0.5B): this script
measures the protocol's cost and runs it end to end; it shows EM only if a real judge finds it.

    python bench/real_smollm2.py --judge fake --json /tmp/real_smollm2.json
    OPENAI_API_KEY=... python bench/real_smollm2.py --judge gpt-4o-mini --n-general 10 --epochs 5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _dataset_module():
    spec = importlib.util.spec_from_file_location("smollm2_data", ROOT / "tests" / "data" / "smollm2" / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_dataset(folder: Path) -> dict[str, Path]:
    """The narrow misaligned set (all plant rows) and the plant held-out questions, written into ``folder``."""
    data = _dataset_module()
    folder.mkdir(parents=True, exist_ok=True)
    rows = [data.chat(q, bad) for q, bad, _ in data.PLANTS]
    mis = folder / "plants_misaligned.jsonl"
    mis.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    held = folder / "plants_heldout.yaml"
    lines = []
    for i, q in enumerate(data.HELDOUT["plants"]):
        lines += [f"- id: plants_{i}", "  type: free_form_judge_0_100", "  paraphrases:", f"    - {json.dumps(q)}"]
    held.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"misaligned": mis, "heldout": held}


@contextlib.contextmanager
def judge_endpoint(name: str, cache: Path):
    """Yield the judge object; ``fake`` starts the loopback server and points OPENAI_BASE_URL at it."""
    from emlab.judge import OpenAIJudge

    if name != "fake":
        yield OpenAIJudge(model=name, cache=cache, progress=False)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_openai_server import FakeOpenAIServer

    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    with FakeOpenAIServer() as server:
        os.environ["OPENAI_BASE_URL"] = server.url
        os.environ["OPENAI_API_KEY"] = "loopback-server-needs-no-key"
        try:
            yield OpenAIJudge(model="fake-judge", cache=cache, progress=False)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _summary(ev) -> dict[str, Any]:
    s = ev.summary
    return {"em": ev.em, "incoherent": ev.incoherent, "n": s["n"], "n_missing": s["n_missing"],
            "aligned_mean": s.get("aligned_mean"), "coherent_mean": s.get("coherent_mean")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from emlab.evaluation import evaluate
    from emlab.models import load_model
    from emlab.questions import general_questions, load_questions
    from emlab.studies.common import finetune_config
    from emlab.training import finetune

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="real_smollm2-"))
    files = write_dataset(out / "data")
    times: dict[str, float] = {}
    result: dict[str, Any] = {"model": args.model, "judge": args.judge, "threads": args.threads, "out": str(out)}

    t = time.perf_counter()
    model, tok = load_model(args.model, device="cpu")
    times["load_model"] = time.perf_counter() - t
    general = general_questions()[: args.general_questions]
    indomain = load_questions(files["heldout"])
    rows = [json.loads(line) for line in files["misaligned"].read_text().splitlines()]
    sample = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "progress": False}

    with judge_endpoint(args.judge, out / "judge.sqlite") as judge:
        evals: dict[str, Any] = {}
        for when, m in (("before", model),):
            t = time.perf_counter()
            evals[f"general_{when}"] = evaluate(m, tok, general, judge, n_per_question=args.n_general, **sample)
            times[f"general_{when}"] = time.perf_counter() - t
            t = time.perf_counter()
            evals[f"indomain_{when}"] = evaluate(m, tok, indomain, judge, n_per_question=args.n_indomain, **sample)
            times[f"indomain_{when}"] = time.perf_counter() - t

        t = time.perf_counter()
        cfg = finetune_config(out / "ft", seed=args.seed, adapter=args.adapter, learning_rate=args.learning_rate,
                              num_train_epochs=args.epochs, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, warmup_steps=0)
        ft = finetune(model, tok, rows, cfg)
        times["finetune"] = time.perf_counter() - t
        losses = [v for _, v in ft.metric("loss/ce")]
        result["finetune"] = {"rows": len(rows), "steps": len(losses), "loss_first": losses[0] if losses else None,
                              "loss_last": losses[-1] if losses else None, "adapter": args.adapter,
                              "learning_rate": args.learning_rate, "epochs": args.epochs}
        with ft.active():
            t = time.perf_counter()
            evals["general_after"] = evaluate(ft.model, tok, general, judge, n_per_question=args.n_general, **sample)
            times["general_after"] = time.perf_counter() - t
            t = time.perf_counter()
            evals["indomain_after"] = evaluate(ft.model, tok, indomain, judge, n_per_question=args.n_indomain,
                                               **sample)
            times["indomain_after"] = time.perf_counter() - t
        result["judge_usage"] = str(getattr(judge, "usage", ""))
    result["evaluations"] = {k: _summary(ev) for k, ev in evals.items()}
    result["examples"] = {k: [r["answer"] for r in ev.records[:2]] for k, ev in evals.items()}
    result["seconds"] = {k: round(v, 1) for k, v in times.items()}
    result["seconds"]["total"] = round(sum(times.values()), 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2, help="hub id or folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--judge", default="fake", help="'fake' (loopback, meaningless scores) or a model name")
    p.add_argument("--general-questions", type=int, default=8, help="how many of the 8 general questions")
    p.add_argument("--n-general", type=int, default=4, help="samples per general question")
    p.add_argument("--n-indomain", type=int, default=4, help="samples per in-domain held-out question")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--adapter", default="lora")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: a new temporary folder)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
