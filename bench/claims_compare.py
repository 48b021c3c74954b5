"""Compare two claims scorecards (the CSVs `emlab claims` writes beside its page), claim by claim.

    python bench/claims_compare.py OLD.csv NEW.csv [--prefix table2/ --prefix ldifs_no_grad/]

Prints how many claims measured in both (n > 0, id starting with a --prefix when given) have the same
mean (numpy.isclose), and each that differs. Used for docs/history.md's sixth-session entry:
`python bench/claims_compare.py docs/claims.csv docs/results/claims_progress.csv --prefix table2/ --prefix ldifs_no_grad/`.
"""

import argparse

import numpy as np
import pandas as pd

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("old")
p.add_argument("new")
p.add_argument("--prefix", action="append", default=[], help="only claims whose id starts with this (repeatable)")
a = p.parse_args()
old, new = (pd.read_csv(f).set_index("claim") for f in (a.old, a.new))
ids = [i for i in old.index if i in new.index and old.loc[i, "n"] > 0 and new.loc[i, "n"] > 0
       and (not a.prefix or any(i.startswith(x) for x in a.prefix))]
differ = [(i, old.loc[i, "mean"], new.loc[i, "mean"]) for i in ids if not np.isclose(old.loc[i, "mean"], new.loc[i, "mean"])]
print(f"{len(ids) - len(differ)} of {len(ids)} claims measured in both have the same mean")
for i, x, y in differ:
    print(f"  {i}: {x:.4g} -> {y:.4g}")
