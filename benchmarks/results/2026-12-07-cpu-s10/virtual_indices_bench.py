# _virtual_indices before (ada3218~1) and after (ada3218), same inputs, outputs checked equal.
# Run from the repository root after: git show ada3218~1:hstu/modules/kv_cache.py > /tmp/kv_old.py
import sys, time, types, torch
sys.path.insert(0, '.')
import importlib.util
spec = importlib.util.spec_from_file_location("kv_old", "/tmp/kv_old.py"); old = importlib.util.module_from_spec(spec); sys.modules["kv_old"] = old; spec.loader.exec_module(old)
from hstu.modules import kv_cache as new
torch.set_num_threads(2)
pe = types.SimpleNamespace(position_table=torch.zeros(8000, 1), use_time_encoding=True, time_bucket_fn="sqrt", time_bucket_increments=60.0, num_time_buckets=2048)
class E:  # stand-in entry: what _virtual_indices reads
    def __init__(self, ts): self.history_timestamps = ts
    @property
    def history_length(self): return int(self.history_timestamps.shape[0])
for users in (32, 128):
    g = torch.Generator().manual_seed(0)
    entries = [E(torch.sort(torch.randint(1_600_000_000, 1_700_000_000, (4096,), generator=g)).values) for _ in range(users)]
    own = [torch.cat([torch.sort(torch.randint(1_700_000_000, 1_700_100_000, (10,), generator=g)).values, torch.full((100,), 1_700_200_000)]) for _ in range(users)]
    targets = [100] * users
    a = old._virtual_indices(pe, entries, targets, own, 6); b = new._virtual_indices(pe, entries, targets, own, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name, mod in (("old", old), ("new", new)):
        t = time.perf_counter()
        for _ in range(5): mod._virtual_indices(pe, entries, targets, own, 6)
        print(users, name, f"{(time.perf_counter() - t) / 5 * 1e3:.1f} ms")
