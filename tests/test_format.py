import numpy as np
import pyarrow as pa

from dr_hf import make_pipeline, reinforcement_features


def test_reinforcement_columns_survive_take_on_sliced_arrays():
    """IterableDataset.shuffle takes rows out of sliced tables: the column types must survive that exactly.
    (pyarrow's take mishandles sliced fixed_size_list<fixed_size_list>, which is why N is a plain list.)"""
    features = reinforcement_features(make_pipeline("imagenet+rare+mix"), num_samples=4, topk=5, num_classes=1000)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        rows.append({
            "dr_index": i,
            "dr_params": {name: np.zeros((4,) + shape, dtype=dtype) + (i % 7) for name, (shape, dtype)
                          in make_pipeline("imagenet+rare+mix").param_fields().items()},
            "dr_topk_indices": rng.integers(0, 1000, (4, 5)).astype(np.uint16),
            "dr_topk_logprobs": -rng.random((4, 5)).astype(np.float16),
        })
    table = pa.Table.from_pylist([features.encode_example(r) for r in rows], schema=features.arrow_schema)
    sliced = table.slice(7)
    order = rng.permutation(len(sliced))
    taken = sliced.take(pa.array(order)).to_pylist()
    expected = [sliced.slice(int(i), 1).to_pylist()[0] for i in order]
    assert taken == expected
