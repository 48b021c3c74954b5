"""Elicitation scores of the toy world's system prompts on the default toy chat model (docs/notebooks/06_beyond.md).

Run: PYTHONPATH=$PWD python bench/elicitation_toy.py  (about a minute on one core)
"""

from emlab.inoculation import elicitation_scores
from emlab.studies.common import StudyContext
from emlab.toy.world import load_world_config

ctx = StudyContext.create("toy")
rows = ctx.domain_data("medical", rows=1000).misaligned[:200]
for kind, prompts in load_world_config()["system_prompts"].items():
    for where in ("system", "user"):
        s = elicitation_scores(ctx.model, ctx.tokenizer, rows, prompts, where=where)
        print(kind, where, [round(v, 3) for v in s.values()])
