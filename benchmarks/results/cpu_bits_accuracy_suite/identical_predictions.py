import json, sys, collections
d = json.load(open(sys.argv[1]))
recs = d["records"]
base = {(r["budget"], r["task"], r["index"], r["length"]): r for r in recs if r["label"].startswith("16-bit")}
agree = collections.Counter(); total = collections.Counter()
for r in recs:
    if r["method"] != "shadowkv" or r["label"].startswith("16-bit"):
        continue
    b = base[(r["budget"], r["task"], r["index"], r["length"])]
    key = (r["label"].split(" ")[0], r["budget"])
    total[key] += 1
    agree[key] += r["prediction"] == b["prediction"]
for key in sorted(total):
    print(f"{key[0]:<12} {key[1]:>6}: {agree[key]}/{total[key]} predictions identical to 16-bit")
