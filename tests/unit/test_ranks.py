"""DistributedDataParallel's parts that need no processes: each rank's share of the data, and the launcher's flags."""

import pytest

from torchship.train.distributed import Ranks, without_launch_flags


@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 3333])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shares_cover_every_item_once_in_order(n, world):
    parts = [Ranks(r, world).share(n) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_launch_flags_are_for_the_launcher_only():
    argv = ["train", "--nproc-per-node", "2", "--epochs", "3", "--nnodes=2", "--rdzv-endpoint", "h:1", "--quiet"]
    assert without_launch_flags(argv) == ["train", "--epochs", "3", "--quiet"]
