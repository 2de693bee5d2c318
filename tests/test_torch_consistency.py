"""largebatch.torch.RankConsistencyCheck under horovodrun -np 2, different data on each rank."""
import pytest

from multirank import run_ranks

pytestmark = pytest.mark.multirank


def test_averaged_ranks_agree_and_unaveraged_ranks_are_caught():
    ok = run_ranks("ranks/torch_consistency.py", "wrapped", np=2)
    assert [str(r["message"]) for r in ok] == ["", ""] and all(int(r["checks"]) == 3 for r in ok)
    bad = run_ranks("ranks/torch_consistency.py", "unwrapped", np=2)
    for r in bad:                                         # both ranks see it, at the first check
        message = str(r["message"])
        assert int(r["failed_at"]) == 2
        assert message.startswith("ranks' weights differ at step 2: sum of '0.weight' is "), message
        assert message.endswith("on rank 1; the ranks are training different models (is the optimizer wrapped with "
                                "largebatch.torch.distributed_optimizer (or hvd.DistributedOptimizer) and the state "
                                "broadcast from rank 0?)"), message
