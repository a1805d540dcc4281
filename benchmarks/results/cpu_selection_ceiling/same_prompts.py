"""Per sample: the same prompts (context tokens, references) as the dense reference rows; scores per family."""
import json, sys
from collections import defaultdict
ref = json.load(open(sys.argv[1]))["records"]
dense = {(r["task"], r["index"]): r for r in ref if r["method"] == "dense"}
fam_dense = defaultdict(list)
for (t, i), r in dense.items():
    fam_dense[t].append(r["score"])
for path in sys.argv[2:]:
    recs = json.load(open(path))["records"]
    fam = defaultdict(list)
    for r in recs:
        d = dense[(r["task"], r["index"])]
        assert d["context_tokens"] == r["context_tokens"] and d["references"] == r["references"], (path, r["task"], r["index"])
        fam[r["task"]].append(r["score"])
    means = {t: 100 * sum(v) / len(v) for t, v in fam.items()}
    dmeans = {t: 100 * sum(fam_dense[t]) / len(fam_dense[t]) for t in fam}
    gaps = " / ".join(f"{means[t] - dmeans[t]:+.2f}" for t in means)
    print(path, len(recs), " / ".join(f"{v:.1f}" for v in means.values()),
          f"mean {sum(means.values())/len(means):.2f} (dense {sum(dmeans.values())/len(dmeans):.2f}); gaps {gaps}")
