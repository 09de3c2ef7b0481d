"""Compare two run folders: every safetensors tensor, results.json rows, distilled-set metadata."""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
a, b = Path(sys.argv[1]), Path(sys.argv[2])
fa = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
fb = sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
print("files only in", a, sorted(set(fa) - set(fb)), "only in", b, sorted(set(fb) - set(fa)))
bad = 0
for rel in sorted(set(fa) & set(fb)):
    ta, tb = load_file(a / rel), load_file(b / rel)
    same = ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    bad += not same
    print(("EQUAL  " if same else "DIFFER ") + str(rel), len(ta), "tensors")
ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
print("results.json rows equal:", ra == rb, len(ra), "rows; bytes equal:", (a / "results.json").read_bytes() == (b / "results.json").read_bytes())

def meta(p):
    n = int.from_bytes(p.read_bytes()[:8], "little")
    return json.loads(p.read_bytes()[8:8 + n]).get("__metadata__", {})
for rel in sorted(set(fa) & set(fb)):
    ma, mb = meta(a / rel), meta(b / rel)
    if ma != mb:
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        print("metadata", rel, {k: (ma.get(k, "<absent>")[:60] if isinstance(ma.get(k), str) else ma.get(k), (mb.get(k, "<absent>") or "")[:60]) for k in keys})
print("tensor files differing:", bad)
