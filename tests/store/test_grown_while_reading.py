"""A store that stage one grows while a training reader uses it: the reader stops with a message
that names the growth (nothing is damaged), not "run surpipe verify --repair"."""

import pytest

from helpers.growth import _encode, _extract, _surd


def test_reader_of_a_store_that_grew_names_the_growth(make_surd, tiny_models, tmp_path):
    from surpipe.errors import SurpipeError
    from surpipe.store import FeatureStore
    from surpipe.train.groups import resolve_groups
    from surpipe.train.data import BlockReader

    store = tmp_path / "s.zarr"
    small = _surd(make_surd, 7, "seven")
    _extract(small, store, tiny_models)
    _encode(small, store, tiny_models)
    fs = FeatureStore(store)
    groups, problems = resolve_groups(fs, llm_layer=3, llm_group=None, clip_group=None, vae_group=None,
                                      use_flip=True)
    assert not problems
    reader = BlockReader(str(store), groups, fs.block_rows)
    last = reader.num_blocks - 1
    reader[last]  # readable before the growth
    _extract(_surd(make_surd, 12, "twelve"), store, tiny_models)  # grows: the last block reopens for new rows
    with pytest.raises(SurpipeError) as e:
        reader[last]
    assert "grew from 7 to 12 rows" in str(e.value) and "verify --repair" not in str(e.value)
