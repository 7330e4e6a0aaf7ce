#!/usr/bin/env bash
# One device call: FA4 backend checks per family and head, then the attention benchmark.
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | grep -v "Warning\|exe_args" | tee $OUT/direct.log
import time, torch, traceback
from sparsec.plan import HeadGroup
from sparsec.runtime import fa4, reference
cases = {"window": {"window": [37, 0]}, "sink_window": {"sink": [4, 0], "window": [50, 0]},
         "multi_diagonal": {"period": [40, 0], "width": [5, 0], "count": 3},
         "vertical_stripe": {"columns": [0, 1, 77, 300], "window": [20, 0]},
         "block_topk": {"block": 64, "grid": [4, 4], "blocks": [[1, 0], [3, 1], [2, 2]]}, "dense": {}}
D = 128
q = torch.randn(1, 4, 777, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 2, 777, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
for kind, params in cases.items():
    groups = [HeadGroup(kind, params, [1, 2])]
    try:
        call = fa4.site_call(q, k, v, D ** -0.5, True, groups)
        out = torch.zeros(q.shape, device="cuda", dtype=q.dtype); call(q, k, v, out)
        ref = reference.sparse_attention(q.float(), k.float(), v.float(), None, D ** -0.5, True, groups)
        errs = [round(((out[:, h].float() - ref[:, h]).norm() / ref[:, h].norm()).item(), 4) for h in (1, 2)]
        bad = ((out[:, 1].float() - ref[:, 1]).abs().amax(-1) > 0.05)[0].nonzero()[:5].flatten().tolist()
        print(f"{kind}: per-head rel err {errs}, first bad rows {bad}")
    except Exception:
        print(f"{kind}: FAILED"); traceback.print_exc()
PY
timeout ${BENCH_S:-150} python3 -m sparsec bench attention --n 16384 --kv-heads 32 \
    --cases sink_window block_topk mixed --json $OUT/bench.json 2>&1 | tee $OUT/bench.log | grep -v "^{" | tail -8
