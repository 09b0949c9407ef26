"""Batch memory recycled between DataLoader workers and the training process (dr_hf.batch_memory): a block is
written again only once the training process has freed every tensor, view and autograd record of it."""

import gc

import torch

from dr_hf.batch_memory import BatchPool, LeasedTensor, _arrive, shared_empty, worker_pool

SIZE = (4, 1024)  # 16 KiB: four pages a block


def filled(items):
    """A worker's batch: a pooled block holding the item's value, and how often the worker's pool reused a block."""
    pool = worker_pool()
    block = pool.empty(SIZE, torch.float32)
    block.fill_(float(items[0]))
    return pool.lease({"x": block, "reused": torch.tensor(pool.reused), "allocated": torch.tensor(pool.allocated)})


def loader(n, workers=1):
    return torch.utils.data.DataLoader(range(n), batch_size=1, num_workers=workers, collate_fn=filled)


def test_blocks_held_here_are_never_rewritten_and_freed_ones_are_reused():
    held, views, grads = {}, {}, []
    conv = torch.nn.Linear(1024, 1)
    for k, batch in enumerate(loader(64, workers=2)):
        assert type(batch["x"]) is torch.Tensor and batch["x"].is_shared()  # a plain tensor here, the worker's memory
        if k % 8 == 0:
            held[k] = batch["x"]  # the whole batch tensor
        elif k % 8 == 1:
            views[k] = batch["x"][2:]  # a view only
        elif k % 8 == 2:
            views[k] = torch.empty(0).set_(batch["x"].untyped_storage(), 0, SIZE)  # another tensor on its storage
        elif k % 8 == 3:
            grads.append((k, conv(batch["x"]).sum()))  # an autograd record only: saved for the weight's gradient
        last = batch
        del batch
    gc.collect()
    assert all(bool((x == k).all()) for k, x in held.items())
    assert all(bool((x == k).all()) for k, x in views.items())
    for k, out in grads:  # the saved input is still the batch's: the gradient is the sum of its rows
        conv.zero_grad()
        out.backward()
        assert torch.equal(conv.weight.grad, torch.full((1, 1024), 4.0 * k))
    # half the batches were dropped at once: their blocks went back to the workers (4 blocks each)
    assert int(last["reused"]) > 0 and int(last["allocated"]) < 32


def test_a_worker_whose_blocks_are_all_held_allocates_afresh():
    batches = list(loader(12))  # every batch kept: nothing may be reused
    assert [int(b["x"][0, 0]) for b in batches] == list(range(12))
    assert all(bool((b["x"] == k).all()) for k, b in enumerate(batches))
    assert int(batches[-1]["reused"]) == 0 and int(batches[-1]["allocated"]) == 12


def test_leased_tensors_are_tensors_in_the_worker_and_blocks_come_back_from_failed_batches():
    pool = BatchPool(blocks=1)
    block = pool.empty((2, 3), torch.float32)
    leased = pool.lease({"x": block.fill_(1.0), "y": torch.zeros(2)})
    assert isinstance(leased["x"], LeasedTensor) and type(leased["y"]) is torch.Tensor
    assert type(leased["x"] * 2) is torch.Tensor and float((leased["x"] * 2).sum()) == 12.0
    busy = pool.empty((2, 3), torch.float32)  # the leased block is busy until freed where it is sent
    assert busy.data_ptr() != block.data_ptr() and pool.allocated == 2
    failed = BatchPool(blocks=1)
    first = failed.empty((2, 3), torch.float32)
    failed.give_back()  # a collator that raised: its block was never leased
    assert failed.empty((2, 3), torch.float32).data_ptr() == first.data_ptr() and failed.reused == 1


def test_blocks_grow_to_fit_and_the_smallest_free_one_that_holds_a_batch_is_reused():
    pool = BatchPool(blocks=2)
    small = pool.empty((100,))
    assert small.numel() == 100 and small.dtype == torch.uint8 and small.is_shared()
    large = pool.empty((3 << 20,))  # the first block is lent: a second one
    assert large.data_ptr() != small.data_ptr() and pool.allocated == 2
    pool.give_back()
    floats = pool.empty((4, 1000), torch.float32)  # 16,000 bytes: the smaller block holds them
    assert floats.shape == (4, 1000) and floats.data_ptr() == small.data_ptr() and pool.reused == 1
    pool.give_back()
    larger = pool.empty((4 << 20,))  # no free block holds it: a free one too small is replaced
    assert larger.numel() == 4 << 20 and pool.allocated == 3
    assert larger.data_ptr() not in (small.data_ptr(), large.data_ptr())
    assert isinstance(pool.leased(larger), LeasedTensor)  # on its way to the training process: busy
    again = pool.empty((3 << 20,))  # the other block is free and holds it
    assert again.data_ptr() == large.data_ptr() and pool.reused == 2
    pool.leased(again)
    spare = pool.empty((10,))  # every block busy: a fresh tensor outside the pool
    assert spare.data_ptr() not in (larger.data_ptr(), large.data_ptr()) and pool.allocated == 4
    assert type(pool.leased(spare)) is torch.Tensor



HELD = []


def _drop_held():
    HELD.clear()
    gc.collect()


def test_a_forked_copy_of_the_training_process_freeing_a_batch_does_not_release_it():
    import multiprocessing

    flag = shared_empty((1,), torch.int32).fill_(1)  # a worker's block, busy
    HELD.append(_arrive(torch.zeros(4), flag))  # the batch as it arrives in the training process (unpickled)
    child = multiprocessing.get_context("fork").Process(target=_drop_held)  # a copy of this process frees its copy
    child.start()
    child.join(60)
    assert child.exitcode == 0 and int(flag) == 1  # still busy: this process holds the batch
    HELD.clear()
    assert int(flag) == 0  # freed here: the worker may write the block again
